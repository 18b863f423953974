//! The one place that orders the tower layers. Outermost first; each layer says why it sits
//! where it does.

use tower::ServiceBuilder;

use crate::{
    layers::{
        CatchPanic, CatchPanicLayer, RecordMetrics, RecordMetricsLayer, RequestBody,
        RequestBodyLayer, RequestContext, RequestContextLayer,
    },
    router::Router,
    AppState,
};

/// The service each connection runs, spelled out: every layer's future is a named type, so a
/// request's way down the stack costs no allocation of its own (the router's future is the one
/// boxed, for the handler's async fns).
pub type HttpService = CatchPanic<RequestContext<RecordMetrics<RequestBody<Router>>>>;

pub fn build(state: &AppState) -> HttpService {
    let router = Router::new(
        state.proxy.clone(),
        state.engine.clone(),
        state.metrics.clone(),
    );
    ServiceBuilder::new()
        // Outermost, so that a panic anywhere below (a handler bug, a bad input we did not
        // foresee) becomes one caller's 500 in OpenAI's shape, not a dropped connection.
        .layer(CatchPanicLayer)
        // Before anything that may log or debug-print headers: marks the credentials sensitive;
        // gives every request an id (the caller's x-request-id, or a new UUID, sent upstream
        // too) and a span named by it, so every log line of the request carries it; puts the
        // id on replies that have none of their own.
        .layer(RequestContextLayer)
        // Metrics see every request that got this far, including those the body limit refuses,
        // and time each to the end of its response body.
        .layer(RecordMetricsLayer::new(state.metrics.clone()))
        // Innermost before routing: size and idle bounds on what the caller uploads.
        .layer(RequestBodyLayer::new(
            state.config.server.max_body_bytes,
            state.config.server.max_buffered_request_bytes,
            state.config.upstream.body_idle_timeout,
            state.metrics.clone(),
        ))
        .service(router)
}
