//! What an end-to-end test needs besides the fake upstream: an embedcar on port 0 in front of
//! it, a plain HTTP client, and readers for replies.

use std::time::{Duration, Instant};

use bytes::Bytes;
use embedcar::{body::ProxyBody, Config};
use fake_openai::FakeUpstream;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::Value;

/// A config for a test: both listeners on free ports, the given upstream, quiet logs.
pub fn config_for(upstream_url: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.upstream.url = upstream_url.to_string();
    c.server.shutdown_grace = Duration::from_secs(5);
    c
}

/// Starts embedcar with `config`.
pub async fn start_proxy(config: Config) -> embedcar::Handle {
    embedcar::start(config).await.expect("embedcar starts")
}

/// Waits until `/readyz` says ready (the tokenizer's tables load at start), as an orchestrator
/// would before sending traffic.
pub async fn wait_ready(handle: &embedcar::Handle) {
    for _ in 0..600 {
        if admin_text(handle, "/readyz").await.0 == StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("embedcar did not become ready within 30 s");
}

pub type TestClient = Client<HttpConnector, ProxyBody>;

/// A keep-alive HTTP/1.1 client, like most applications' HTTP clients.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client with prior knowledge (h2c), to check the listener speaks both.
pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn post_json(url: &str, body: &Value) -> Request<ProxyBody> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(embedcar::body::full(body.to_string()))
        .unwrap()
}

pub fn get(url: &str) -> Request<ProxyBody> {
    Request::get(url).body(embedcar::body::empty()).unwrap()
}

pub async fn send(client: &TestClient, req: Request<ProxyBody>) -> Response<Incoming> {
    client.request(req).await.expect("request reaches embedcar")
}

pub async fn body_bytes(r: Response<Incoming>) -> Bytes {
    r.into_body()
        .collect()
        .await
        .expect("whole body")
        .to_bytes()
}

pub async fn body_json(r: Response<Incoming>) -> Value {
    let bytes = body_bytes(r).await;
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// Asserts `r` is an error of `status` in OpenAI's shape and returns its `error` object.
pub async fn expect_openai_error(r: Response<Incoming>, status: StatusCode) -> Value {
    assert_eq!(r.status(), status, "status");
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let v = body_json(r).await;
    let e = v.get("error").cloned().expect("an `error` object");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e["code"].is_string(), "{v}");
    assert!(e.get("param").is_some(), "{v}");
    e
}

/// The admin endpoint's text, e.g. `/metrics`.
pub async fn admin_text(handle: &embedcar::Handle, path: &str) -> (StatusCode, String) {
    let r = send(&client(), get(&format!("{}{path}", handle.admin_url()))).await;
    let status = r.status();
    (
        status,
        String::from_utf8(body_bytes(r).await.to_vec()).unwrap(),
    )
}

/// The value of one Prometheus sample line (`name{labels} value`) whose text starts with
/// `series`, e.g. `embedcar_requests_total{method="GET",route="models",status="200"}`.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// embedcar's `/metrics` text (asserting a 200).
pub async fn metrics_text(handle: &embedcar::Handle) -> String {
    let (status, text) = admin_text(handle, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    text
}

/// The value of a metric series now (0 when it has not appeared yet).
pub async fn metric(handle: &embedcar::Handle, series: &str) -> f64 {
    metric_value(&metrics_text(handle).await, series).unwrap_or(0.0)
}

/// Waits (real time, up to 10 s) until a metric series reaches `want`.
pub async fn wait_metric(handle: &embedcar::Handle, series: &str, want: f64) {
    wait_for_metric(
        handle,
        series,
        |now| now == want,
        &format!(", expected {want}"),
    )
    .await
}

/// Waits (real time, up to 10 s) until a metric series satisfies `ok`.
pub async fn wait_metric_until(handle: &embedcar::Handle, series: &str, ok: impl Fn(f64) -> bool) {
    wait_for_metric(handle, series, ok, "").await
}

async fn wait_for_metric(
    handle: &embedcar::Handle,
    series: &str,
    ok: impl Fn(f64) -> bool,
    expected: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(handle, series).await;
        if ok(now) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {now}{expected}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every upstream slot held by a streamed chat reply that the fake keeps open, so that what is
/// sent meanwhile queues inside embedcar (deterministically, without timing) until
/// [`HeldSlots::release`].
pub struct HeldSlots<'a> {
    upstream: &'a FakeUpstream,
    streams: Vec<tokio::task::JoinHandle<()>>,
}

pub async fn hold_slots<'a>(
    proxy: &embedcar::Handle,
    upstream: &'a FakeUpstream,
    n: usize,
) -> HeldSlots<'a> {
    upstream.hold_streams(true);
    let before = upstream.in_flight();
    let url = format!("{}/v1/chat/completions", proxy.url());
    let streams = (0..n)
        .map(|_| {
            let c = client();
            let req = post_json(
                &url,
                &serde_json::json!({"model": "gpt-4o-mini", "stream": true,
                        "messages": [{"role": "user", "content": "hold a slot"}]}),
            );
            tokio::spawn(async move {
                let r = send(&c, req).await;
                assert_eq!(r.status(), StatusCode::OK);
                body_bytes(r).await;
            })
        })
        .collect();
    assert!(
        upstream
            .wait_until(Duration::from_secs(10), |u| u.in_flight() >= before + n)
            .await,
        "the holding streams did not all reach the upstream"
    );
    HeldSlots { upstream, streams }
}

impl HeldSlots<'_> {
    pub async fn release(self) {
        self.upstream.hold_streams(false);
        self.upstream.release_streams();
        for s in self.streams {
            s.await.expect("holding stream");
        }
    }
}
