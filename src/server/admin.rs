//! The admin listener: liveness, readiness, metrics and the status page on a port of their own,
//! so that probes and scrapes are answered even when the traffic port is saturated, and so that
//! the traffic port exposes nothing but the API.

use std::{convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    server::{accept_with_backoff, status::Status},
    AppState,
};

/// Ends a task when dropped, so the status sampler stops with the listener however `serve` ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the admin endpoints until `stop` resolves. The status page's history is sampled here,
/// so it lives exactly as long as the page that shows it.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: impl Future<Output = ()>) {
    let status = Arc::new(Status::new());
    let _sampler = AbortOnDrop(tokio::spawn(
        status.clone().run_sampler(state.metrics.clone()),
    ));
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = accept_with_backoff("admin", || listener.accept()) => accepted,
            () = &mut stop => return,
        };
        let state = state.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                let status = status.clone();
                async move { Ok::<_, Infallible>(handle(&state, &status, req)) }
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

/// What the page may load: nothing but its own inline script and style and its own JSON, so a
/// page that reached for a CDN would break in testing, not first in an air-gapped cluster.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

fn handle(state: &AppState, status: &Status, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
            } else if state
                .shared
                .as_ref()
                .is_some_and(|t| t.required && !t.reachable())
            {
                // Only with `redis.required`: otherwise an outage costs the sharing, not the pod.
                text(StatusCode::SERVICE_UNAVAILABLE, "redis unreachable\n")
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
        "/" => {
            let mut r = Response::new(Full::new(Bytes::from_static(
                crate::server::status::PAGE.as_bytes(),
            )));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(PAGE_CSP),
            );
            r
        }
        "/status.json" => {
            let mut r = Response::new(Full::new(Bytes::from(status.json(state))));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            // Live figures: a cached copy would show a healthy upstream that is down now.
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try / /status.json /healthz /readyz /metrics\n",
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
