//! The one place that orders the tower layers. Outermost first; each layer says why it sits
//! where it does.

use std::{convert::Infallible, sync::Arc};

use http::{header, HeaderName, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::{util::BoxCloneService, ServiceBuilder};
use tower_http::{
    catch_panic::CatchPanicLayer,
    map_response_body::MapResponseBodyLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    sensitive_headers::SetSensitiveRequestHeadersLayer,
};

use crate::{
    body::ProxyBody,
    errors,
    layers::{
        LogThrottle, RecordMetricsLayer, ReportFailuresLayer, RequestBodyLayer, RequestSpanLayer,
        FAILURE_LOG_INTERVAL,
    },
    router::Router,
    AppState,
};

/// The service each connection runs, with its concrete type erased so the server need not
/// spell it.
pub type HttpService = BoxCloneService<Request<Incoming>, Response<ProxyBody>, Infallible>;

pub fn build(state: &AppState) -> HttpService {
    let router = Router::new(state.proxy.clone(), state.engine.clone());
    let throttle = Arc::new(LogThrottle::new(FAILURE_LOG_INTERVAL));
    let service = ServiceBuilder::new()
        // Erases the response body type the layers below build up, so one body type reaches
        // the server.
        .layer(MapResponseBodyLayer::new(BodyExt::boxed_unsync))
        // Outermost, so that a panic anywhere below (a handler bug, a bad input we did not
        // foresee) becomes one caller's 500 in OpenAI's shape, not a dropped connection.
        .layer(CatchPanicLayer::custom(errors::panic_response))
        // Before anything that may log or debug-print headers: marks the credentials sensitive
        // so that `Debug` output shows them as "Sensitive".
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            HeaderName::from_static("api-key"),
            header::COOKIE,
        ]))
        // Give every request an id (the caller's x-request-id, or a new UUID) before the trace
        // span is made, so every log line of the request carries it. The id goes upstream too,
        // as Envoy does, so both sides' logs can be joined.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // On the way back, the upstream's own x-request-id wins (OpenAI's `req_...` is what its
        // support asks for); our id fills in when the reply has none (embedcar's own errors).
        .layer(PropagateRequestIdLayer::x_request_id())
        // One span per request, named by its id, around the handler; headers are never
        // recorded.
        .layer(RequestSpanLayer)
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
        .service(router);
    BoxCloneService::new(service)
}
