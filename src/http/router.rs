//! The innermost service: picks the handler for a request and turns a handler's error into its
//! reply. `POST` to an embeddings path goes to the engine; everything else passes through.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Method, Request, Response};
use tower::Service;

use crate::{
    embeddings::{EmbeddingsPath, Engine},
    http::{body::ProxyBody, errors::ProxyError, route::Route},
    passthrough::Proxy,
};

#[derive(Clone)]
pub struct Router {
    proxy: Arc<Proxy>,
    engine: Option<Arc<Engine>>,
}

impl Router {
    pub fn new(proxy: Arc<Proxy>, engine: Option<Arc<Engine>>) -> Self {
        Self { proxy, engine }
    }
}

impl Service<Request<ProxyBody>> for Router {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let proxy = self.proxy.clone();
        let engine = self
            .engine
            .clone()
            .filter(|_| req.method() == Method::POST)
            .and_then(|e| EmbeddingsPath::of(req.uri().path()).map(|p| (e, p)));
        Box::pin(async move {
            let route = req
                .extensions()
                .get::<Route>()
                .copied()
                .unwrap_or_else(|| Route::of(req.uri().path()));
            let handled = match engine {
                Some((engine, path)) => engine.handle(req, path).await,
                None => proxy.forward(req, route).await,
            };
            // Counted and logged with every other error reply by `ReportFailures` (stack.rs).
            Ok(handled.unwrap_or_else(ProxyError::into_response))
        })
    }
}
