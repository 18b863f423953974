//! The admin listener: liveness, readiness and metrics on a port of their own, so that probes
//! and scrapes are answered even when the traffic port is saturated, and so that the traffic
//! port exposes nothing but the API.

use std::{convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{server::accept_with_backoff, AppState};

/// Serves the admin endpoints until `stop` resolves.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = accept_with_backoff("admin", || listener.accept()) => accepted,
            () = &mut stop => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(crate::config::DEFAULT_HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn handle(state: &AppState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        // Alive as long as the process can answer: restarting a draining proxy helps no one.
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // Not ready once draining, so the pod leaves the endpoints while it finishes its work.
        "/readyz" => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.engine.is_some() && !crate::embeddings::tokens::loaded() {
                // Traffic waits until the first callers would not: the tokenizer's tables
                // load in the background at start (a second or so).
                text(StatusCode::SERVICE_UNAVAILABLE, "loading the tokenizer\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/metrics" => {
            if let Some(engine) = &state.engine {
                let (entries, bytes) = engine.cache().usage();
                state.metrics.observe_cache(entries, bytes);
            }
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /readyz /metrics\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
