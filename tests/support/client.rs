//! The callers' side of an end-to-end test: a reply read whole ([`Reply`]), requests sent one at
//! a time or many at once on their own tasks, and headers added to a request.

use std::time::{Duration, Instant};

use bytes::Bytes;
use embedcar::body::ProxyBody;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use serde_json::Value;
use tokio::task::JoinHandle;

use super::harness::{body_bytes, send, TestClient};

/// A reply read whole, so that it can cross task boundaries and be looked at twice, with how
/// long the caller waited for it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// From sending the request to the reply's last byte.
    pub took: Duration,
    /// When the caller sent it.
    pub sent: Instant,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(500)])
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// One of embedcar's `x-embedcar-*` counters.
    pub fn count(&self, name: &str) -> usize {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name} header: {:?}", self.headers))
            .parse()
            .unwrap()
    }

    /// An embeddings reply's `usage.prompt_tokens` (asserted equal to `total_tokens`).
    pub fn prompt_tokens(&self) -> u64 {
        let v = self.json();
        assert_eq!(
            v["usage"]["prompt_tokens"], v["usage"]["total_tokens"],
            "{}",
            v["usage"]
        );
        v["usage"]["prompt_tokens"].as_u64().expect("usage")
    }

    /// The `code` of an error reply in OpenAI's shape.
    pub fn code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some(), "{v}");
        e["code"].as_str().unwrap_or_default().to_string()
    }

    /// Asserts an error embedcar made itself: `status`, OpenAI's shape, `code`.
    pub fn assert_own_error(&self, status: StatusCode, code: &str) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.code(), code);
        assert_eq!(self.header("x-embedcar-error"), Some(code));
    }

    /// Retry-After in whole seconds, if present.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {v}"))
        })
    }

    pub fn should_retry(&self) -> Option<&str> {
        self.header("x-should-retry")
    }
}

/// Sends `req` and reads the whole reply.
pub async fn call(client: &TestClient, req: Request<ProxyBody>) -> Reply {
    let sent = Instant::now();
    let r = send(client, req).await;
    let status = r.status();
    let headers = r.headers().clone();
    let body = body_bytes(r).await;
    Reply {
        status,
        headers,
        body,
        took: sent.elapsed(),
        sent,
    }
}

/// [`call`] on its own task.
pub fn spawn_call(client: &TestClient, req: Request<ProxyBody>) -> JoinHandle<Reply> {
    let client = client.clone();
    tokio::spawn(async move { call(&client, req).await })
}

/// Sends each request on its own task, all at once.
pub fn spawn_all(client: &TestClient, reqs: Vec<Request<ProxyBody>>) -> Vec<JoinHandle<Reply>> {
    reqs.into_iter()
        .map(|req| spawn_call(client, req))
        .collect()
}

/// The replies of spawned calls, in the order of `pending`.
pub async fn join_all(pending: Vec<JoinHandle<Reply>>) -> Vec<Reply> {
    let mut out = Vec::with_capacity(pending.len());
    for p in pending {
        out.push(p.await.expect("caller task"));
    }
    out
}

/// Sends every request at once, each on its own task; the replies in the order of `reqs`.
pub async fn call_all(client: &TestClient, reqs: Vec<Request<ProxyBody>>) -> Vec<Reply> {
    join_all(spawn_all(client, reqs)).await
}

/// `req` with headers added or replaced (e.g. another `authorization` than `post_json`'s
/// `Bearer sk-test`).
pub fn with_headers(mut req: Request<ProxyBody>, headers: &[(&str, &str)]) -> Request<ProxyBody> {
    for (name, value) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    req
}
