//! End to end through a real embedcar on port 0 in front of the fake upstream: what the
//! resilience layer promises when the upstream misbehaves. Faults injected on a share of the
//! upstream's calls are retried away and every caller still gets its exact vectors; an upstream
//! that is down gets every caller answered by its deadline while the circuit breaker opens,
//! probes once and closes; rate limits hold at the upstream however hard callers push; the
//! upstream's own 429 shuts a credential's gate for every caller of that credential and only
//! that one; a client's timeout hint ends the work; queues are bounded; and
//! `x-should-retry: false` marks exactly the failures embedcar already retried.
//!
//! Everything runs in real time. The issue asks for paused time where it speaks of seconds, but
//! with real sockets between the proxy and the fake, tokio's paused clock jumps over network
//! waits (a first-byte timeout fires before the fake could answer); so delays are kept short
//! (tens of milliseconds, or one second where the behaviour is about a server's Retry-After) and
//! timing bounds are generous.

mod support;

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use embedcar::{body::ProxyBody, Config, Handle};
use fake_openai::{
    billed_tokens, decode_embedding, expected_embedding, parse_embedding_input, Behavior,
    EmbeddingInput, FakeOptions, FakeUpstream, Recorded, Rule,
};
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::json;
use support::{client::*, harness::*};
use tokio::task::JoinHandle;

/// An OpenAI embedding model: embedcar counts its tokens exactly, and the fake bills the same.
const MODEL: &str = "text-embedding-3-small";
/// The fake's vector length when a request names no `dimensions`.
const DIMS: usize = 8;

const BUDGET_EXHAUSTED: &str = "embedcar_retry_budget_exhausted_total";
const GATE_CLOSURES: &str = "embedcar_rate_gate_closures_total";
const GATE_REJECTIONS: &str = "embedcar_rate_gate_rejections_total";
const GATE_WAITS: &str = "embedcar_rate_gate_wait_seconds_count";
const BREAKER_STATE: &str = "embedcar_circuit_breaker_state";
const QUEUE_DEPTH: &str = "embedcar_embeddings_queue_depth";
const REQUESTS_IN_FLIGHT: &str = "embedcar_requests_in_flight";

fn retries(reason: &str) -> String {
    format!("embedcar_retries_total{{reason=\"{reason}\"}}")
}

fn transitions(state: &str) -> String {
    format!("embedcar_circuit_breaker_transitions_total{{state=\"{state}\"}}")
}

fn shed(reason: &str) -> String {
    format!("embedcar_shed_requests_total{{reason=\"{reason}\"}}")
}

fn deadline_expired(kind: &str) -> String {
    format!("embedcar_deadline_expired_total{{kind=\"{kind}\"}}")
}

fn ratelimit_exhausted(kind: &str) -> String {
    format!("embedcar_upstream_ratelimit_exhausted_total{{kind=\"{kind}\"}}")
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// One single-input embeddings request with credential `key`, asking for float vectors.
fn embedding(proxy: &Handle, key: &str, input: &str) -> Request<ProxyBody> {
    let body = json!({"model": MODEL, "input": input, "encoding_format": "float"});
    with_headers(
        post_json(&format!("{}/v1/embeddings", proxy.url()), &body),
        &[("authorization", &format!("Bearer {key}"))],
    )
}

/// A pass-through request (`GET /v1/models`) with credential `key`.
fn pass_through(proxy: &Handle, key: &str) -> Request<ProxyBody> {
    Request::get(format!("{}/v1/models", proxy.url()))
        .header("authorization", format!("Bearer {key}"))
        .body(embedcar::body::empty())
        .unwrap()
}

/// A pass-through `POST /v1/chat/completions` with credential `key`.
fn chat(proxy: &Handle, key: &str, content: &str) -> Request<ProxyBody> {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]});
    with_headers(
        post_json(&format!("{}/v1/chat/completions", proxy.url()), &body),
        &[("authorization", &format!("Bearer {key}"))],
    )
}

/// Asserts a successful single-input reply carries, bit for bit as float32, the fake's vector
/// for `input`, and no `x-should-retry`.
fn assert_vector(reply: &Reply, input: &str) {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{input}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    let v = reply.json();
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{input}");
    let got = decode_embedding(&data[0]["embedding"]).expect("a float vector");
    let want = expected_embedding(&EmbeddingInput::Text(input.to_string()), DIMS);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want), "{input}: wrong vector");
    assert_eq!(reply.should_retry(), None, "a success is not marked final");
}

/// How far past its deadline a reply may reach the test and still count as "by the deadline":
/// the test's own scheduling on a loaded machine, not embedcar's. A reply embedcar held past a
/// deadline would be late by a retry delay or an attempt timeout, seconds at least.
const LATE_TOLERANCE: Duration = Duration::from_secs(1);

/// A config for these tests: both listeners on port 0, and backoffs of milliseconds so that
/// retries do not dominate the runtime.
fn config(upstream_url: &str) -> Config {
    let mut c = config_for(upstream_url);
    c.retry.base_backoff = Duration::from_millis(20);
    c.retry.max_backoff = Duration::from_millis(200);
    c
}

/// Starts embedcar with `config`, the tokenizer loaded: the cl100k tables load on the first
/// embeddings request of the process (half a second in a debug build), inside that request's
/// deadline, and would otherwise skew whichever test happens to send it.
async fn start(config: Config) -> Handle {
    embedcar::embeddings::tokens::load_for(Some(MODEL)).await;
    start_proxy(config).await
}

/// The sum of every series of a labelled metric, e.g. all `embedcar_retries_total{..}`.
async fn metric_sum(proxy: &Handle, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    metrics_text(proxy)
        .await
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Opens `n` keep-alive connections to embedcar before a test's callers need them, so that `n`
/// callers sent at once each find one idle and their waits are embedcar's alone: left to open
/// their own, hundreds of requests race for new connections in the client's pool and some wait
/// for a connection another request finished with (half a second and more here). Each warm-up
/// request is an embeddings request whose body is held back until all `n` are open, then
/// completed without `input`: a 400 from embedcar, no upstream call.
async fn warm_connections(client: &TestClient, proxy: &Handle, n: usize) {
    let url = format!("{}/v1/embeddings", proxy.url());
    let (release, released) = tokio::sync::watch::channel(false);
    let before = metric(proxy, REQUESTS_IN_FLIGHT).await;
    let pending = (0..n)
        .map(|_| {
            let mut released = released.clone();
            let body = futures_util::stream::once(async move {
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                    r#"{{"model":"{MODEL}"}}"#
                ))))
            });
            let body = StreamBody::new(body)
                .map_err(|e: Infallible| -> embedcar::body::BoxError { match e {} })
                .boxed_unsync();
            let req = Request::post(&url)
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            spawn_call(client, req)
        })
        .collect();
    wait_metric_until(proxy, REQUESTS_IN_FLIGHT, |m| m >= before + n as f64).await;
    release.send(true).unwrap();
    for r in join_all(pending).await {
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }
}

/// A port with nothing listening on it (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The upstream's requests with the time the test first saw each one (the fake records no
/// arrival times of its own), polled every millisecond: a seen time is at most a few
/// milliseconds after the real arrival, never before it.
struct Arrivals {
    log: Arc<Mutex<Vec<(Instant, Recorded)>>>,
    task: JoinHandle<()>,
}

impl Arrivals {
    fn watch(upstream: Arc<FakeUpstream>) -> Arrivals {
        let log = Arc::new(Mutex::new(Vec::<(Instant, Recorded)>::new()));
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                loop {
                    let known = log.lock().unwrap().len();
                    if upstream.request_count() > known {
                        let now = Instant::now();
                        let new: Vec<Recorded> =
                            upstream.requests().into_iter().skip(known).collect();
                        log.lock()
                            .unwrap()
                            .extend(new.into_iter().map(|r| (now, r)));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        Arrivals { log, task }
    }

    /// Waits until `n` requests with `Bearer {key}` have been seen; returns their times.
    async fn wait_for(&self, key: &str, n: usize) -> Vec<Instant> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.of(key);
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests seen",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn all(&self) -> Vec<(Instant, Recorded)> {
        self.log.lock().unwrap().clone()
    }

    /// Arrival times of the requests carrying `Bearer {key}`.
    fn of(&self, key: &str) -> Vec<Instant> {
        let auth = format!("Bearer {key}");
        self.all()
            .into_iter()
            .filter(|(_, r)| r.header("authorization") == Some(auth.as_str()))
            .map(|(t, _)| t)
            .collect()
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The fault matrix: 20% of upstream calls fail, 200 callers still get their vectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    RetryAfter,
    RetryAfterMs,
    RateLimitResetOnly,
    Status500,
    Status502,
    Status503,
    ConnectionReset,
    HangPastAttemptTimeout,
    TruncatedBody,
}

impl Fault {
    fn behavior(self) -> Behavior {
        match self {
            // The one case with a whole second: every such 429 shuts the gate for a second.
            Fault::RetryAfter => Behavior::openai_error(429).with_header("retry-after", "1"),
            Fault::RetryAfterMs => Behavior::openai_error(429).with_header("retry-after-ms", "50"),
            Fault::RateLimitResetOnly => Behavior::openai_error(429)
                .with_header("x-ratelimit-reset-requests", "30ms")
                .with_header("x-ratelimit-reset-tokens", "50ms"),
            Fault::Status500 => Behavior::openai_error(500),
            Fault::Status502 => Behavior::openai_error(502),
            Fault::Status503 => Behavior::openai_error(503),
            Fault::ConnectionReset => Behavior::Drop,
            Fault::HangPastAttemptTimeout => Behavior::Hang,
            Fault::TruncatedBody => Behavior::Malformed,
        }
    }

    /// The `reason` label its retries are counted under.
    fn retry_reason(self) -> &'static str {
        match self {
            Fault::RetryAfter | Fault::RetryAfterMs | Fault::RateLimitResetOnly => "429",
            Fault::Status500 => "500",
            Fault::Status502 => "502",
            Fault::Status503 => "503",
            Fault::ConnectionReset | Fault::TruncatedBody => "io_error",
            Fault::HangPastAttemptTimeout => "timeout",
        }
    }

    fn is_429(self) -> bool {
        self.retry_reason() == "429"
    }
}

/// 200 single-input callers at once while every fifth upstream embeddings call (in order of
/// arrival, retries included) fails with `fault`: every caller gets its exact vector, none waits
/// past its deadline, each fault costs exactly one retry, and the retries stay within the budget.
async fn fault_matrix(fault: Fault) {
    const CALLERS: usize = 200;
    const ROUNDS: usize = 100;
    let upstream = FakeUpstream::start().await;
    // 20% of calls, deterministically: four normal calls, then the fault, over and over (more
    // rounds than the test uses; the default behaviour after them is normal too).
    for _ in 0..ROUNDS {
        upstream.push_rule(Rule::repeat(Behavior::Normal, 4).on_path("/embeddings"));
        upstream.push_rule(Rule::once(fault.behavior()).on_path("/embeddings"));
    }
    // Four or so faults: with `retry-after: 1` each stops the credential for a second.
    let timeout = Duration::from_secs(if fault == Fault::RetryAfter { 10 } else { 3 });
    let mut c = config(&upstream.url());
    c.limits.max_concurrency = 4;
    c.limits.request_timeout = timeout;
    // Calls of at most 16 inputs: 200 callers make at least 13 calls, so faults do happen.
    c.embeddings.max_inputs_per_call = 16;
    c.upstream.first_byte_timeout = Duration::from_millis(300);
    // Faults are interleaved with four calls in flight, so a call may meet the fault again on
    // its retry; with 8 attempts that cannot plausibly happen often enough to fail a caller.
    c.retry.max_attempts = 8;
    let budget_ratio = f64::from(c.retry.budget_ratio);
    let budget_floor = f64::from(c.retry.budget_min_per_second) * 10.0;
    let proxy = start(c).await;

    let client = client();
    warm_connections(&client, &proxy, CALLERS).await;
    let input = |i: usize| format!("fault matrix caller {i} asks about {fault:?}");
    let started = Instant::now();
    let pending = (0..CALLERS)
        .map(|i| spawn_call(&client, embedding(&proxy, "sk-test", &input(i))))
        .collect();
    let replies = join_all(pending).await;
    let elapsed = started.elapsed();

    for (i, r) in replies.iter().enumerate() {
        assert_vector(r, &input(i));
        assert!(r.took < timeout, "caller {i} waited {:?}", r.took);
    }
    assert_eq!(
        upstream.embedding_inputs(),
        CALLERS,
        "every input answered once"
    );

    let left = upstream
        .pending_rules()
        .iter()
        .filter(|r| r.behavior == fault.behavior())
        .map(|r| r.times)
        .sum::<usize>();
    let faults = ROUNDS - left;
    assert!(faults >= 2, "only {faults} faults were injected");
    let calls = upstream.request_count();
    assert!(
        faults * 5 <= calls,
        "{faults} faults in {calls} calls is more than 20%"
    );

    // Each fault was retried exactly once (the retry may have met the next fault, which then
    // counts as its own), nothing else was retried, and the budget never ran dry.
    let retried = metric(&proxy, &retries(fault.retry_reason())).await;
    assert_eq!(retried, faults as f64, "{fault:?}: {faults} faults");
    assert_eq!(
        metric_sum(&proxy, "embedcar_retries_total").await,
        retried,
        "no other retries"
    );
    assert_eq!(metric(&proxy, BUDGET_EXHAUSTED).await, 0.0);
    let first_attempts = (calls as f64) - retried;
    assert!(
        retried <= budget_ratio * first_attempts + budget_floor,
        "{retried} retries for {first_attempts} calls"
    );
    if fault.is_429() {
        assert_eq!(
            metric(&proxy, GATE_CLOSURES).await,
            faults as f64,
            "every 429 shut the gate"
        );
    }
    if fault == Fault::RetryAfter {
        assert!(
            elapsed >= Duration::from_secs(1),
            "a gate closure of 1 s, yet done in {elapsed:?}"
        );
    }
    assert_eq!(
        metric(&proxy, BREAKER_STATE).await,
        0.0,
        "scattered faults do not open the breaker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_429_with_retry_after() {
    fault_matrix(Fault::RetryAfter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_429_with_retry_after_ms() {
    fault_matrix(Fault::RetryAfterMs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_429_with_only_ratelimit_reset_headers() {
    fault_matrix(Fault::RateLimitResetOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_500() {
    fault_matrix(Fault::Status500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_502() {
    fault_matrix(Fault::Status502).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_503() {
    fault_matrix(Fault::Status503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_connection_reset() {
    fault_matrix(Fault::ConnectionReset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_hang_past_the_attempt_timeout() {
    fault_matrix(Fault::HangPastAttemptTimeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_truncated_json_body() {
    fault_matrix(Fault::TruncatedBody).await;
}

// ---------------------------------------------------------------------------------------------
// 2. An upstream down for good, the breaker, and recovery
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Down {
    /// Nothing listens: connections are refused.
    Refused,
    /// Connections are accepted, requests never answered.
    Hanging,
}

/// What a caller gets while the upstream is down: an error by its deadline, and either
/// embedcar's breaker refusal (503 + Retry-After) or the failure embedcar gave up on, marked
/// `x-should-retry: false`.
fn assert_failed_in_time(r: &Reply, deadline: Duration) {
    assert!(
        r.took <= deadline + LATE_TOLERANCE,
        "answered after {:?}, deadline {deadline:?}",
        r.took
    );
    match (r.status.as_u16(), r.code().as_str()) {
        (503, "upstream_circuit_open") => {
            assert!(r.retry_after().is_some_and(|s| s >= 1), "{:?}", r.headers);
        }
        // Given up after at least the client's own three attempts: marked, and then without
        // a Retry-After (the two would contradict). After fewer (the breaker opened on other
        // callers' failures meanwhile): left for the client, with a Retry-After.
        (502, "upstream_unreachable") | (504, "upstream_timeout") => {
            let marked = r.should_retry() == Some("false");
            assert!(
                marked != r.retry_after().is_some(),
                "either marked final or told when to retry: {:?}",
                r.headers
            );
        }
        // An embeddings caller whose own deadline passed while its call was still retrying.
        (504, "deadline_exceeded") => {}
        (status, code) => panic!("unexpected answer {status} {code}"),
    }
}

/// While the upstream is down, 40 callers (embeddings and pass-through) are each answered by
/// their deadline with 502/503/504; the breaker opens. When the upstream comes back, the first
/// thing it sees is one probe, alone, however many callers are pushing; the probe's success
/// closes the breaker and traffic resumes within the concurrency limit.
async fn upstream_down_for_good(down: Down) {
    let port = closed_port();
    let url = format!("http://127.0.0.1:{port}");
    let hanging = match down {
        Down::Refused => None,
        Down::Hanging => {
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let fake = FakeUpstream::bind(addr, FakeOptions::default())
                .await
                .expect("the fake binds its port");
            fake.set_behavior(Behavior::Hang);
            Some(fake)
        }
    };
    let deadline = Duration::from_secs(2);
    let slots = 4;
    let mut c = config(&url);
    c.limits.request_timeout = deadline;
    c.limits.max_concurrency = slots;
    c.upstream.first_byte_timeout = Duration::from_millis(400);
    c.breaker.connect_failures = 3;
    c.breaker.min_calls = 3;
    c.breaker.cooldown = Duration::from_secs(1);
    c.retry.base_backoff = Duration::from_millis(50);
    let proxy = start(c).await;
    let client = client();

    // Down: ten waves of four callers, 100 ms apart.
    let mut pending = Vec::new();
    for wave in 0..10 {
        for j in 0..2 {
            let input = format!("while down: wave {wave} caller {j}");
            pending.push(spawn_call(&client, embedding(&proxy, "sk-test", &input)));
            pending.push(spawn_call(&client, pass_through(&proxy, "sk-test")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replies = join_all(pending).await;
    for r in &replies {
        assert_failed_in_time(r, deadline);
    }
    let refused = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert!(refused > 0, "the breaker never answered");
    assert!(metric(&proxy, &transitions("open")).await >= 1.0);
    // Once every attempt is over the breaker rests open (a probe may have failed meanwhile).
    wait_metric_until(&proxy, BREAKER_STATE, |s| s == 1.0).await;

    // Back: the upstream answers again, slowly enough that a burst would overlap the probe.
    let probe_time = Duration::from_millis(250);
    let upstream = match hanging {
        None => {
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let fake = FakeUpstream::bind(addr, FakeOptions::default())
                .await
                .expect("the fake binds the upstream's port");
            fake.set_behavior(Behavior::Delay(probe_time));
            fake
        }
        Some(fake) => {
            fake.set_behavior(Behavior::Delay(probe_time));
            assert!(
                fake.wait_until(Duration::from_secs(5), |u| u.in_flight() == 0)
                    .await,
                "hung requests were not cancelled"
            );
            fake.reset_stats();
            fake
        }
    };

    // Eight callers push as fast as they are answered.
    let stop = Arc::new(AtomicBool::new(false));
    let serial = Arc::new(AtomicUsize::new(0));
    let pushers: Vec<JoinHandle<Vec<Reply>>> = (0..8)
        .map(|p| {
            let (client, stop, serial) = (client.clone(), stop.clone(), serial.clone());
            let url = proxy.url();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let n = serial.fetch_add(1, Ordering::SeqCst);
                    let req = if p % 2 == 0 {
                        let body = json!({"model": MODEL, "input": format!("after recovery {n}"),
                                          "encoding_format": "float"});
                        post_json(&format!("{url}/v1/embeddings"), &body)
                    } else {
                        // The same credential as the embeddings callers: one circuit, one probe.
                        let mut req = get(&format!("{url}/v1/models"));
                        req.headers_mut()
                            .insert("authorization", "Bearer sk-test".parse().unwrap());
                        req
                    };
                    out.push(call(&client, req).await);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                out
            })
        })
        .collect();

    assert!(
        upstream
            .wait_until(Duration::from_secs(5), |u| u.request_count() >= 1)
            .await,
        "no probe reached the upstream after the cool-down"
    );
    tokio::time::sleep(probe_time / 2).await;
    assert_eq!(
        upstream.request_count(),
        1,
        "while the probe is out, nothing else reaches the recovering upstream"
    );
    wait_metric_until(&proxy, BREAKER_STATE, |s| s == 0.0).await;
    let closed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);
    let mut after = Vec::new();
    for p in pushers {
        after.extend(p.await.unwrap());
    }

    for r in &after {
        if r.status != StatusCode::OK {
            assert_failed_in_time(r, deadline);
            assert!(r.sent < closed_at, "failed after the breaker closed: {r:?}");
        }
    }
    let served = after
        .iter()
        .filter(|r| r.sent > closed_at && r.status == StatusCode::OK)
        .count();
    assert!(served >= 8, "traffic did not resume: {served} answered");
    assert!(
        upstream.peak_concurrency() <= slots,
        "peak {} over {slots} slots",
        upstream.peak_concurrency()
    );
    for state in ["open", "half_open", "closed"] {
        assert!(
            metric(&proxy, &transitions(state)).await >= 1.0,
            "never {state}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_connections_gets_every_caller_answered_in_time_and_the_breaker_cycles(
) {
    upstream_down_for_good(Down::Refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gets_every_caller_answered_in_time_and_the_breaker_cycles()
{
    upstream_down_for_good(Down::Hanging).await;
}

/// Every caller of a down upstream is told what to do next: come back after a Retry-After, or
/// (once embedcar made the client's three attempts itself) not at all, `x-should-retry: false`
/// (then without a Retry-After, which would contradict it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_answer_while_the_upstream_is_down_says_when_to_retry_or_not_to() {
    let mut c = config(&format!("http://127.0.0.1:{}", closed_port()));
    c.breaker.enabled = false;
    let refusing = start(c).await;
    let hanging = FakeUpstream::start().await;
    hanging.set_behavior(Behavior::Hang);
    let mut c = config(&hanging.url());
    c.breaker.enabled = false;
    c.upstream.first_byte_timeout = Duration::from_millis(200);
    c.limits.request_timeout = Duration::from_secs(1);
    let silent = start(c).await;
    let client = client();
    let mut missing = Vec::new();
    for proxy in [&refusing, &silent] {
        for r in [
            call(&client, pass_through(proxy, "sk-test")).await,
            call(&client, embedding(proxy, "sk-test", "down")).await,
        ] {
            assert!(r.status.is_server_error(), "{}", r.status);
            let marked = r.should_retry() == Some("false");
            if marked == r.retry_after().is_some() {
                missing.push(format!(
                    "{} {} {:?}",
                    r.status.as_u16(),
                    r.code(),
                    r.headers
                ));
            }
        }
    }
    assert!(missing.is_empty(), "neither or both: {missing:?}");
}

#[tokio::test]
async fn the_breaker_opens_when_every_call_fails_refuses_at_once_and_one_probe_closes_it() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::openai_error(500));
    let mut c = config(&upstream.url());
    c.breaker.min_calls = 3;
    c.breaker.cooldown = Duration::from_millis(500);
    c.retry.max_attempts = 1;
    let proxy = start(c).await;
    let client = client();

    for _ in 0..3 {
        let r = call(&client, pass_through(&proxy, "sk-test")).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(metric(&proxy, BREAKER_STATE).await, 1.0, "open");
    for r in [
        call(&client, pass_through(&proxy, "sk-test")).await,
        call(&client, embedding(&proxy, "sk-test", "refused")).await,
    ] {
        r.assert_own_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_circuit_open");
        // At once: not after waiting out the cool-down for a probe (nothing is sent, below).
        assert!(r.took < Duration::from_millis(500), "at once: {:?}", r.took);
        assert_eq!(r.retry_after(), Some(1), "the cool-down left, rounded up");
    }
    assert_eq!(upstream.request_count(), 3, "nothing sent while open");
    assert!(metric(&proxy, &shed("upstream_circuit_open")).await >= 1.0);

    // After the cool-down one probe goes; it fails, and the breaker opens again.
    tokio::time::sleep(Duration::from_millis(550)).await;
    let r = call(&client, pass_through(&proxy, "sk-test")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "the probe");
    assert_eq!(upstream.request_count(), 4);
    let r = call(&client, pass_through(&proxy, "sk-test")).await;
    r.assert_own_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_circuit_open");
    assert_eq!(metric(&proxy, &transitions("open")).await, 2.0);

    // The next probe succeeds and closes it.
    upstream.set_behavior(Behavior::Normal);
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_vector(
        &call(&client, embedding(&proxy, "sk-test", "the probe")).await,
        "the probe",
    );
    assert_eq!(metric(&proxy, BREAKER_STATE).await, 0.0, "closed");
    assert_eq!(metric(&proxy, &transitions("half_open")).await, 2.0);
    assert_eq!(metric(&proxy, &transitions("closed")).await, 1.0);
    let r = call(&client, pass_through(&proxy, "sk-test")).await;
    assert_eq!(r.status, StatusCode::OK);

    // 4xx are answers, not failures: they never open it.
    upstream.set_behavior(Behavior::openai_error(400));
    for _ in 0..5 {
        let r = call(&client, pass_through(&proxy, "sk-test")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(metric(&proxy, BREAKER_STATE).await, 0.0);
}

/// The embeddings engine's own refusals (breaker open, gate closed) are answers embedcar makes
/// itself, like the pass-through's, and the shed metric is documented as counting those.
#[tokio::test]
async fn the_engines_breaker_refusals_are_counted_as_shed() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::openai_error(500));
    let mut c = config(&upstream.url());
    c.breaker.min_calls = 1;
    c.breaker.cooldown = Duration::from_secs(30);
    c.retry.max_attempts = 1;
    let proxy = start(c).await;
    let client = client();
    let r = call(&client, pass_through(&proxy, "sk-test")).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let r = call(&client, embedding(&proxy, "sk-test", "refused")).await;
    r.assert_own_error(StatusCode::SERVICE_UNAVAILABLE, "upstream_circuit_open");
    assert_eq!(metric(&proxy, &shed("upstream_circuit_open")).await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// 3. Rate gates: requests and tokens per minute, at the upstream, with many callers pushing
// ---------------------------------------------------------------------------------------------

/// GCRA lets a full minute's quota through at once, then one cell every 60/N seconds; so over
/// any run of `t` seconds the upstream sees at most N + N·t/60.
fn gcra_bound(per_minute: u32, t: Duration) -> f64 {
    f64::from(per_minute) * (1.0 + t.as_secs_f64() / 60.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_per_minute_are_never_exceeded_at_the_upstream_with_500_callers_pushing() {
    const RPM: u32 = 120; // a burst of 120, then 2 per second
    const CALLERS: usize = 500;
    let upstream = Arc::new(FakeUpstream::start().await);
    let deadline = Duration::from_secs(3);
    let mut c = config(&upstream.url());
    c.limits.requests_per_minute = RPM;
    c.limits.request_timeout = deadline;
    let proxy = start(c).await;
    let arrivals = Arrivals::watch(upstream.clone());

    let client = client();
    warm_connections(&client, &proxy, CALLERS).await;
    let started = Instant::now();
    let pending = (0..CALLERS)
        .map(|_| spawn_call(&client, pass_through(&proxy, "sk-test")))
        .collect();
    let replies = join_all(pending).await;
    let elapsed = started.elapsed();

    let seen = upstream.request_count();
    assert!(
        seen as f64 <= gcra_bound(RPM, elapsed) + 1.0,
        "{seen} requests in {elapsed:?}"
    );
    assert!(
        seen >= RPM as usize,
        "the burst was not let through: {seen}"
    );
    // Not only in total: by every moment of the run, the upstream had seen no more than the
    // burst plus the rate times the time so far.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let times: Vec<Instant> = arrivals.all().into_iter().map(|(t, _)| t).collect();
    assert_eq!(times.len(), seen);
    for (k, t) in times.iter().enumerate() {
        let so_far = t.duration_since(started);
        assert!(
            (k + 1) as f64 <= gcra_bound(RPM, so_far) + 1.0,
            "{} requests by {so_far:?}",
            k + 1
        );
    }

    let mut ok = 0;
    let mut limited = 0;
    let mut late = 0;
    for r in &replies {
        assert!(r.took <= deadline + LATE_TOLERANCE, "waited {:?}", r.took);
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                r.assert_own_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
                assert!(r.retry_after().is_some_and(|s| s >= 1));
                limited += 1;
            }
            // Callers still waiting for an upstream slot (held by callers at the gate) at
            // their deadline.
            StatusCode::SERVICE_UNAVAILABLE => {
                r.assert_own_error(StatusCode::SERVICE_UNAVAILABLE, "proxy_overloaded");
                assert!(r.retry_after().is_some());
            }
            // The gate lets a caller through as long as its deadline is not yet past, so one
            // that passes in its last milliseconds may not hear from the upstream in time.
            StatusCode::GATEWAY_TIMEOUT => {
                r.assert_own_error(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
                late += 1;
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(
        ok <= seen && seen <= ok + late,
        "{ok} answered, {late} too late, {seen} at the upstream"
    );
    assert!(limited > 0);
    assert_eq!(metric(&proxy, GATE_REJECTIONS).await, limited as f64);
    assert_eq!(metric(&proxy, &shed("rate_limited")).await, limited as f64);
    assert!(
        metric(&proxy, GATE_WAITS).await >= 1.0,
        "some waited and passed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_per_minute_are_never_exceeded_at_the_upstream_with_300_callers_pushing() {
    const TPM: u32 = 600; // a burst of 600 tokens, then 10 per second
    const CALLERS: usize = 300;
    let upstream = FakeUpstream::start().await;
    let deadline = Duration::from_secs(3);
    let mut c = config(&upstream.url());
    c.limits.tokens_per_minute = TPM;
    c.limits.request_timeout = deadline;
    c.limits.max_concurrency = 4;
    // Calls no larger than the minute's budget (see the ignored test below for larger ones).
    c.embeddings.max_tokens_per_call = 60;
    let proxy = start(c).await;

    let client = client();
    warm_connections(&client, &proxy, CALLERS).await;
    let input = |i: usize| format!("token gate caller {i} says a few more words");
    let started = Instant::now();
    let pending = (0..CALLERS)
        .map(|i| spawn_call(&client, embedding(&proxy, "sk-test", &input(i))))
        .collect();
    let replies = join_all(pending).await;
    let elapsed = started.elapsed();

    let mut tokens = 0u64;
    for r in upstream.requests() {
        let inputs = parse_embedding_input(&r.json().unwrap()["input"]).unwrap();
        tokens += inputs
            .iter()
            .map(|i| u64::from(billed_tokens(MODEL, i)))
            .sum::<u64>();
    }
    assert!(
        tokens as f64 <= gcra_bound(TPM, elapsed),
        "{tokens} tokens in {elapsed:?}"
    );
    assert!(
        tokens >= u64::from(TPM) - 60,
        "the burst was not used: {tokens}"
    );

    let mut ok = 0;
    for (i, r) in replies.iter().enumerate() {
        assert!(r.took <= deadline + LATE_TOLERANCE, "waited {:?}", r.took);
        match r.status {
            StatusCode::OK => {
                assert_vector(r, &input(i));
                ok += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                r.assert_own_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
                assert!(r.retry_after().is_some());
            }
            StatusCode::GATEWAY_TIMEOUT => {
                r.assert_own_error(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(ok, upstream.embedding_inputs());
    assert!(ok < CALLERS, "the gate held nobody back");
}

/// Even merged, calls never carry more tokens than the minute's budget allows: the dispatcher
/// sizes a merged call to what the gate can let through, so the upstream sees no more than the
/// configured limit (plus GCRA's burst) however many callers queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_call_never_exceeds_the_tokens_per_minute_budget() {
    const TPM: u32 = 100;
    let upstream = FakeUpstream::start().await;
    let mut c = config(&upstream.url());
    c.limits.tokens_per_minute = TPM;
    c.limits.max_concurrency = 1;
    c.limits.request_timeout = Duration::from_secs(2);
    let proxy = start(c).await;
    let held = hold_slots(&proxy, &upstream, 1).await;
    let client = client();
    let input = |i: usize| format!("queued caller {i} says a few more words");
    let pending: Vec<_> = (0..40)
        .map(|i| spawn_call(&client, embedding(&proxy, "sk-test", &input(i))))
        .collect();
    wait_metric_until(&proxy, QUEUE_DEPTH, |d| d == 40.0).await;
    held.release().await;
    join_all(pending).await;
    let tokens: u64 = upstream
        .requests()
        .iter()
        .filter(|r| r.path() == "/v1/embeddings")
        .flat_map(|r| parse_embedding_input(&r.json().unwrap()["input"]).unwrap())
        .map(|i| u64::from(billed_tokens(MODEL, &i)))
        .sum();
    assert!(
        tokens as f64 <= gcra_bound(TPM, Duration::from_secs(3)),
        "{tokens} tokens against a budget of {TPM} per minute"
    );
}

/// GCRA answers "when could one more pass", not "when will my turn come": callers behind a
/// queue of others all see the next free cell, sleep, and race for it, so one who can never get
/// through before its deadline waits until then instead of being told at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_the_gate_cannot_serve_before_their_deadline_are_refused_at_once() {
    let upstream = FakeUpstream::start().await;
    let mut c = config(&upstream.url());
    c.limits.requests_per_minute = 60; // a burst of 60, then 1 per second
    c.limits.request_timeout = Duration::from_secs(2);
    let proxy = start(c).await;
    let client = client();
    for _ in 0..60 {
        assert_eq!(
            call(&client, pass_through(&proxy, "sk-test")).await.status,
            StatusCode::OK
        );
    }
    // At most two of these can pass within their 2 s; the rest can be told at once.
    let pending = (0..10)
        .map(|_| spawn_call(&client, pass_through(&proxy, "sk-test")))
        .collect();
    let replies = join_all(pending).await;
    let refused: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(refused.len() >= 8);
    // Told at once, not at the 2 s deadline they would otherwise wait out: before even the
    // next 1 s cell, so a loaded machine cannot make this fail.
    for r in refused {
        assert!(
            r.took < Duration::from_secs(1),
            "refused after {:?}, as if waiting for the deadline",
            r.took
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The upstream's 429 shuts the credential's gate, for everyone, and only that credential
// ---------------------------------------------------------------------------------------------

/// The issue's scenario is `retry-after: 2` in paused time; with real sockets this runs in real
/// time with `retry-after: 1`, and checks the order of events (a's traffic after its reset, b's
/// answers while a waits) rather than how long each took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_429_with_retry_after_stops_all_dispatch_for_that_credential_then_traffic_resumes() {
    let upstream = Arc::new(FakeUpstream::start().await);
    upstream.push_rule(
        Rule::once(Behavior::openai_error(429).with_header("retry-after", "1"))
            .on_path("/embeddings"),
    );
    let proxy = start(config(&upstream.url())).await;
    let arrivals = Arrivals::watch(upstream.clone());
    let client = client();

    let first = spawn_call(
        &client,
        embedding(&proxy, "sk-a", "a: the one that meets the 429"),
    );
    wait_metric_until(&proxy, GATE_CLOSURES, |n| n == 1.0).await;
    let limited_at = arrivals.wait_for("sk-a", 1).await[0];

    // For the next 0.8 s, callers of both credentials keep coming.
    let mut a = Vec::new();
    let mut b = Vec::new();
    for k in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let input = format!("a: caller {k} during the pause");
        a.push((
            input.clone(),
            spawn_call(&client, embedding(&proxy, "sk-a", &input)),
        ));
        let input = format!("b: caller {k} during the pause");
        b.push((
            input.clone(),
            spawn_call(&client, embedding(&proxy, "sk-b", &input)),
        ));
    }

    // Credential b is not held by a's gate: its first callers (sent in the first half of the
    // pause) are all answered while a's first caller still waits for the reopening.
    for (k, (input, p)) in b.into_iter().enumerate() {
        let r = p.await.unwrap();
        assert_vector(&r, &input);
        if k < 4 {
            assert!(
                !first.is_finished(),
                "b's caller {k} was answered only after a's gate reopened: held for {:?}",
                r.took
            );
        }
    }
    let r = first.await.unwrap();
    assert_vector(&r, "a: the one that meets the 429");
    for (input, p) in a {
        assert_vector(&p.await.unwrap(), &input);
    }

    let a_times = arrivals.of("sk-a");
    assert!(a_times.len() >= 2, "the retry and the queued callers");
    for t in &a_times[1..] {
        let after = t.duration_since(limited_at);
        assert!(
            after >= Duration::from_millis(950),
            "credential a reached the upstream {after:?} after its 429"
        );
    }
    let b_during_pause = arrivals
        .of("sk-b")
        .iter()
        .filter(|t| t.duration_since(limited_at) < Duration::from_millis(900))
        .count();
    assert!(b_during_pause >= 1, "credential b went on meanwhile");
    assert_eq!(metric(&proxy, GATE_CLOSURES).await, 1.0);
    assert_eq!(metric(&proxy, &retries("429")).await, 1.0);
}

/// While a credential's gate is shut, a caller whose deadline comes before the reopening is
/// told at once (429, rate_limited, Retry-After), on the engine and on the pass-through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_deadline_comes_before_the_gate_reopens_gets_429_at_once() {
    let upstream = FakeUpstream::start().await;
    let proxy = start(config(&upstream.url())).await;
    let client = client();
    upstream.push_rule(
        Rule::once(Behavior::openai_error(429).with_header("retry-after", "3")).on_path("/v1/"),
    );
    let first = spawn_call(&client, pass_through(&proxy, "sk-a"));
    wait_metric_until(&proxy, GATE_CLOSURES, |n| n == 1.0).await;

    // 2 s: before the gate reopens (3 s), long enough that being told at once and waiting the
    // deadline out cannot be mistaken for each other on a loaded machine.
    let hurried = [("x-stainless-read-timeout", "2")];
    for req in [
        with_headers(embedding(&proxy, "sk-a", "in a hurry"), &hurried),
        with_headers(pass_through(&proxy, "sk-a"), &hurried),
    ] {
        let r = call(&client, req).await;
        r.assert_own_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        assert!(
            r.took < Duration::from_secs(1),
            "not at once, as if waiting for the 2 s deadline: {:?}",
            r.took
        );
        assert!(!first.is_finished(), "answered before the gate reopened");
        assert!(r.retry_after().is_some_and(|s| (1..=3).contains(&s)));
    }
    assert_eq!(metric(&proxy, GATE_REJECTIONS).await, 2.0);
    // The caller that met the 429 is retried after the server's delay, and succeeds.
    let r = first.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.took >= Duration::from_millis(2950), "{:?}", r.took);
    assert_eq!(upstream.request_count(), 2, "the 429 and its retry");
}

/// The same, for a caller that arrives after the lane is already waiting at the shut gate: it
/// is refused at once too (429), not left to wait out its own deadline for a 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hopeless_caller_arriving_while_the_lane_waits_at_the_gate_gets_429_at_once() {
    let upstream = FakeUpstream::start().await;
    upstream.push_rule(
        Rule::once(Behavior::openai_error(429).with_header("retry-after", "3"))
            .on_path("/embeddings"),
    );
    let proxy = start(config(&upstream.url())).await;
    let client = client();
    let first = spawn_call(&client, embedding(&proxy, "sk-a", "meets the 429"));
    wait_metric_until(&proxy, GATE_CLOSURES, |n| n == 1.0).await;
    // A patient caller: the lane's dispatcher starts and waits at the gate.
    let patient = spawn_call(&client, embedding(&proxy, "sk-a", "patient"));
    wait_metric_until(&proxy, QUEUE_DEPTH, |d| d == 1.0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = call(
        &client,
        with_headers(
            embedding(&proxy, "sk-a", "in a hurry"),
            &[("x-stainless-read-timeout", "2")],
        ),
    )
    .await;
    r.assert_own_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    // At once, not at its 2 s deadline, and before the gate reopened (3 s) for the patient one.
    assert!(
        r.took < Duration::from_secs(1),
        "not at once, as if waiting for the deadline: {:?}",
        r.took
    );
    assert!(!patient.is_finished(), "answered before the gate reopened");
    assert_vector(&first.await.unwrap(), "meets the 429");
    assert_vector(&patient.await.unwrap(), "patient");
}

/// A pass-through request passes its credential's rate gate before it takes an upstream slot,
/// so callers waiting at a shut gate hold no slot and callers of other credentials do not wait
/// behind them. (The gate is shut here by a success with `x-ratelimit-remaining-requests: 0`,
/// so that no retry is waiting: see the next test for that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_callers_held_at_one_credentials_gate_do_not_hold_back_another() {
    let upstream = FakeUpstream::start().await;
    upstream.push_rule(Rule::once(
        Behavior::Normal
            .with_header("x-ratelimit-remaining-requests", "0")
            .with_header("x-ratelimit-reset-requests", "1s"),
    ));
    let mut c = config(&upstream.url());
    c.limits.max_concurrency = 1;
    let proxy = start(c).await;
    let client = client();
    let r = call(&client, pass_through(&proxy, "sk-a")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(metric(&proxy, GATE_CLOSURES).await, 1.0);
    let waiting = spawn_call(&client, pass_through(&proxy, "sk-a"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = call(&client, pass_through(&proxy, "sk-b")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        !waiting.is_finished(),
        "credential b was answered only after a's gate reopened: it waited {:?} behind it",
        r.took
    );
    assert_eq!(waiting.await.unwrap().status, StatusCode::OK);
}

/// A call waiting out a retry delay (here the upstream's `retry-after: 3`) lets its upstream
/// slot go for the wait, on both paths, so even with one slot other credentials do not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_out_a_retry_delay_does_not_hold_an_upstream_slot() {
    let upstream = FakeUpstream::start().await;
    let mut c = config(&upstream.url());
    c.limits.max_concurrency = 1;
    let proxy = start(c).await;
    let client = client();
    // The fake bills with tiktoken, whose tables load on the first billed reply: not part of
    // what is timed here.
    assert_vector(
        &call(&client, embedding(&proxy, "sk-warm", "warm")).await,
        "warm",
    );
    let limited = Behavior::openai_error(429).with_header("retry-after", "3");
    upstream.push_rule(Rule::once(limited.clone()).on_path("/v1/models"));
    upstream.push_rule(Rule::once(limited).on_path("/embeddings"));

    let a = spawn_call(&client, pass_through(&proxy, "sk-a"));
    wait_metric_until(&proxy, GATE_CLOSURES, |n| n == 1.0).await;
    let b_pass_through = call(&client, pass_through(&proxy, "sk-b")).await;
    let b_pass_through_first = !a.is_finished();
    assert_eq!(a.await.unwrap().status, StatusCode::OK);

    let a = spawn_call(&client, embedding(&proxy, "sk-a", "a"));
    wait_metric_until(&proxy, GATE_CLOSURES, |n| n == 2.0).await;
    let b_engine = call(&client, embedding(&proxy, "sk-b", "b")).await;
    let b_engine_first = !a.is_finished();
    assert_vector(&a.await.unwrap(), "a");

    assert_eq!(b_pass_through.status, StatusCode::OK);
    assert_vector(&b_engine, "b");
    // b was answered while a still sat out its 3 s delay: a's wait held the only slot from no one.
    assert!(
        b_pass_through_first && b_engine_first,
        "credential b waited {:?} (pass-through) and {:?} (engine) for a's retry",
        b_pass_through.took,
        b_engine.took
    );
}

/// `x-ratelimit-remaining-*: 0` with a reset, even on a success, shuts the gate until the reset;
/// the remaining budget shows in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_at_zero_on_a_success_shuts_the_gate_until_the_reset() {
    let upstream = Arc::new(FakeUpstream::start().await);
    upstream.push_rule(
        Rule::once(
            Behavior::Normal
                .with_header("x-ratelimit-remaining-requests", "0")
                .with_header("x-ratelimit-reset-requests", "600ms"),
        )
        .on_path("/v1/models"),
    );
    upstream.push_rule(
        Rule::once(
            Behavior::Normal
                .with_header("x-ratelimit-remaining-requests", "7")
                .with_header("x-ratelimit-remaining-tokens", "0")
                .with_header("x-ratelimit-reset-tokens", "600ms"),
        )
        .on_path("/embeddings"),
    );
    let proxy = start(config(&upstream.url())).await;
    let arrivals = Arrivals::watch(upstream.clone());
    let client = client();

    // Requests at zero, on the pass-through.
    let r = call(&client, pass_through(&proxy, "sk-a")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(metric(&proxy, &ratelimit_exhausted("requests")).await, 1.0);
    let r = call(&client, pass_through(&proxy, "sk-a")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.took >= Duration::from_millis(500), "{:?}", r.took);
    let t = arrivals.wait_for("sk-a", 2).await;
    assert!(t[1].duration_since(t[0]) >= Duration::from_millis(580));

    // Tokens at zero, on the engine.
    assert_vector(
        &call(&client, embedding(&proxy, "sk-b", "one")).await,
        "one",
    );
    assert_eq!(metric(&proxy, &ratelimit_exhausted("tokens")).await, 1.0);
    // A remaining budget above zero is counted nowhere (no gauge mixes credentials).
    assert_eq!(metric(&proxy, &ratelimit_exhausted("requests")).await, 1.0);
    let r = call(&client, embedding(&proxy, "sk-b", "two")).await;
    assert_vector(&r, "two");
    assert!(r.took >= Duration::from_millis(500), "{:?}", r.took);
    let t = arrivals.wait_for("sk-b", 2).await;
    assert!(t[1].duration_since(t[0]) >= Duration::from_millis(580));

    assert_eq!(metric(&proxy, GATE_CLOSURES).await, 2.0);
    assert!(metric(&proxy, GATE_WAITS).await >= 1.0);
    assert_eq!(metric_sum(&proxy, "embedcar_retries_total").await, 0.0);
}

// ---------------------------------------------------------------------------------------------
// 5. Deadlines and the client's timeout hint
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_read_timeout_hint_ends_a_pass_through_request_at_one_second() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Hang);
    let proxy = start(config(&upstream.url())).await;
    let r = call(
        &client(),
        with_headers(
            pass_through(&proxy, "sk-test"),
            &[("x-stainless-read-timeout", "1")],
        ),
    )
    .await;
    r.assert_own_error(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    // Not before the hint (a timer never fires early), and far from the 5 min first-byte
    // timeout that would end it without the hint.
    assert!(
        r.took >= Duration::from_millis(950) && r.took < Duration::from_secs(30),
        "{:?}",
        r.took
    );
    assert_eq!(
        r.should_retry(),
        None,
        "embedcar made one attempt and retried nothing: the client keeps its own retry"
    );
    // The upstream request was cancelled, and never tried again.
    assert!(
        upstream
            .wait_until(Duration::from_secs(10), |u| u.in_flight() == 0)
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(upstream.request_count(), 1);
    assert_eq!(metric(&proxy, &deadline_expired("first_byte")).await, 1.0);

    // The Node client's overall timeout hint works the same way.
    let r = call(
        &client(),
        with_headers(
            pass_through(&proxy, "sk-test"),
            &[("x-stainless-timeout", "0.5")],
        ),
    )
    .await;
    r.assert_own_error(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    assert!(r.took >= Duration::from_millis(450), "{:?}", r.took);
    assert!(r.took < Duration::from_secs(30), "{:?}", r.took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_read_timeout_hint_ends_an_embeddings_request_at_one_second() {
    let upstream = FakeUpstream::start().await;
    upstream.push_rule(Rule::once(Behavior::Hang).on_path("/embeddings"));
    let mut c = config(&upstream.url());
    c.upstream.first_byte_timeout = Duration::from_millis(1500);
    let proxy = start(c).await;
    let r = call(
        &client(),
        with_headers(
            embedding(&proxy, "sk-test", "slow"),
            &[("x-stainless-read-timeout", "1")],
        ),
    )
    .await;
    r.assert_own_error(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded");
    // By the hint (1 s), not the attempt's own first-byte timeout (1.5 s) plus a retry: the
    // reply comes before the hung attempt's timeout, which the upstream sees as a cancel.
    assert!(r.took >= Duration::from_millis(950), "{:?}", r.took);
    assert_eq!(
        upstream.request_count(),
        1,
        "answered within the first attempt, before any retry"
    );
    assert_eq!(metric(&proxy, &deadline_expired("embeddings")).await, 1.0);
    // Past the attempt's own timeout, the call is not retried for a caller who has gone.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(upstream.request_count(), 1);
    assert_eq!(metric_sum(&proxy, "embedcar_retries_total").await, 0.0);
}

/// The caller's deadline ends the embeddings call's upstream work too: at 1 s the hung upstream
/// request is cancelled and its slot is free for the next caller, rather than running on to
/// `upstream.first_byte_timeout` (5 s here) and holding the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_read_timeout_hint_also_ends_the_embeddings_upstream_work() {
    let upstream = FakeUpstream::start().await;
    upstream.push_rule(Rule::once(Behavior::Hang).on_path("/embeddings"));
    let mut c = config(&upstream.url());
    c.upstream.first_byte_timeout = Duration::from_secs(5);
    c.limits.max_concurrency = 1;
    let proxy = start(c).await;
    let client = client();
    let r = call(
        &client,
        with_headers(
            embedding(&proxy, "sk-test", "slow"),
            &[("x-stainless-read-timeout", "1")],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    // Cancelled with its caller, well before the 5 s first-byte timeout would have ended it.
    let hung_until = std::time::Instant::now();
    assert!(
        upstream
            .wait_until(Duration::from_secs(3), |u| u.in_flight() == 0)
            .await,
        "the upstream request outlived its only caller"
    );
    let r = call(&client, embedding(&proxy, "sk-test", "next")).await;
    assert_vector(&r, "next");
    assert!(
        hung_until.elapsed() < Duration::from_secs(4),
        "the next caller waited {:?} for the only slot",
        r.took
    );
}

#[tokio::test]
async fn no_retry_is_started_that_would_end_past_the_deadline() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::openai_error(503).with_header("retry-after", "5"));
    let mut c = config(&upstream.url());
    c.limits.request_timeout = Duration::from_secs(2);
    let proxy = start(c).await;
    let client = client();
    for r in [
        call(&client, pass_through(&proxy, "sk-test")).await,
        call(&client, embedding(&proxy, "sk-test", "x")).await,
    ] {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.header("x-embedcar-error"), None, "the upstream's own 503");
        assert_eq!(r.header("retry-after"), Some("5"));
        // One attempt, no time for a second: nothing retried, so the client may still retry
        // (after the upstream's Retry-After, on its own budget).
        assert_eq!(r.should_retry(), None);
        // Well before the 5 s a retry would have waited for.
        assert!(r.took < Duration::from_secs(3), "{:?}", r.took);
    }
    assert_eq!(upstream.request_count(), 2, "one attempt each");
}

// ---------------------------------------------------------------------------------------------
// 6. Retries: what, when, how many
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_request_is_retried_after_a_reset_and_a_503_with_the_same_body() {
    let upstream = FakeUpstream::start().await;
    upstream.push_rule(Rule::once(Behavior::Drop).on_path("/chat/completions"));
    upstream.push_rule(Rule::once(Behavior::openai_error(503)).on_path("/chat/completions"));
    let proxy = start(config(&upstream.url())).await;
    let r = call(&client(), chat(&proxy, "sk-test", "hello")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.should_retry(), None);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3);
    assert!(seen
        .iter()
        .all(|s| s.body == seen[0].body && s.body_complete));
    assert_eq!(metric(&proxy, &retries("io_error")).await, 1.0);
    assert_eq!(metric(&proxy, &retries("503")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_delay_is_honoured_and_capped() {
    let upstream = Arc::new(FakeUpstream::start().await);
    upstream.push_rule(
        Rule::once(Behavior::openai_error(503).with_header("retry-after-ms", "250"))
            .on_path("/v1/models"),
    );
    upstream.push_rule(
        Rule::once(Behavior::openai_error(429).with_header("retry-after", "30"))
            .on_path("/embeddings"),
    );
    let mut c = config(&upstream.url());
    c.retry.max_server_delay = Duration::from_millis(300);
    c.retry.base_backoff = Duration::from_millis(1);
    let proxy = start(c).await;
    let arrivals = Arrivals::watch(upstream.clone());
    let client = client();

    // retry-after-ms 250 (the backoff alone would be about a millisecond).
    let r = call(&client, pass_through(&proxy, "sk-a")).await;
    assert_eq!(r.status, StatusCode::OK);
    let t = arrivals.wait_for("sk-a", 2).await;
    let gap = t[1].duration_since(t[0]);
    assert!(
        gap >= Duration::from_millis(245) && gap < Duration::from_millis(1000),
        "{gap:?}"
    );

    // retry-after 30 s, capped at 300 ms, on the engine; the gate too.
    let r = call(&client, embedding(&proxy, "sk-b", "capped")).await;
    assert_vector(&r, "capped");
    assert!(r.took < Duration::from_secs(2), "{:?}", r.took);
    let t = arrivals.wait_for("sk-b", 2).await;
    let gap = t[1].duration_since(t[0]);
    assert!(
        gap >= Duration::from_millis(290) && gap < Duration::from_millis(1000),
        "{gap:?}"
    );
    let r = call(&client, pass_through(&proxy, "sk-b")).await;
    assert_eq!(r.status, StatusCode::OK, "the gate reopened after the cap");
}

#[tokio::test]
async fn backoff_spreads_retries_exponentially_with_jitter() {
    let upstream = Arc::new(FakeUpstream::start().await);
    upstream.set_behavior(Behavior::openai_error(502));
    let mut c = config(&upstream.url());
    c.retry.max_attempts = 4;
    c.retry.base_backoff = Duration::from_millis(100);
    c.retry.max_backoff = Duration::from_millis(300);
    c.breaker.enabled = false;
    let proxy = start(c).await;
    let arrivals = Arrivals::watch(upstream.clone());
    let r = call(&client(), pass_through(&proxy, "sk-test")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.should_retry(), Some("false"));
    let t = arrivals.wait_for("sk-test", 4).await;
    assert_eq!(t.len(), 4);
    // base·2^(n-1) capped at 300 ms, half of it fixed and half random: at least the fixed half
    // (a timer never fires early). The ranges themselves are checked by the unit test of
    // `Backoff::delay` in src/resilience/retry/backoff.rs, where a loaded machine cannot stretch them.
    for (n, lo) in [50, 100, 150].into_iter().enumerate() {
        let gap = t[n + 1].duration_since(t[n]);
        assert!(
            gap >= Duration::from_millis(lo - 2),
            "retry {}: {gap:?}",
            n + 1
        );
    }
    assert_eq!(metric(&proxy, &retries("502")).await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_retries_against_a_failing_upstream() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::openai_error(500));
    let mut c = config(&upstream.url());
    c.retry.max_attempts = 10;
    c.retry.budget_ratio = 0.0;
    c.retry.budget_min_per_second = 1; // a reserve of 10 retries over the 10 s window
    c.retry.base_backoff = Duration::from_millis(1);
    c.retry.max_backoff = Duration::from_millis(2);
    c.breaker.enabled = false;
    let proxy = start(c).await;
    let client = client();
    let mut marked = 0;
    for i in 0..10 {
        let r = if i % 2 == 0 {
            call(&client, pass_through(&proxy, "sk-test")).await
        } else {
            call(&client, embedding(&proxy, "sk-test", &format!("input {i}"))).await
        };
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        marked += usize::from(r.should_retry() == Some("false"));
    }
    // Once the budget is spent a failure comes back after one attempt, and then it is left to
    // the client's own retries: only those retried three times are marked.
    assert!(marked < 10, "every failure was marked final");
    let calls = upstream.request_count();
    assert!(
        calls <= 10 + 11,
        "{calls} upstream calls: retries beyond the budget"
    );
    let retried = metric(&proxy, &retries("500")).await;
    assert_eq!(retried, (calls - 10) as f64);
    assert!(metric(&proxy, BUDGET_EXHAUSTED).await >= 1.0);
}

// ---------------------------------------------------------------------------------------------
// 7. x-should-retry: false exactly on failures embedcar gave up on
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_up_failures_say_x_should_retry_false_and_nothing_else_does() {
    let upstream = FakeUpstream::start().await;
    let mut c = config(&upstream.url());
    c.breaker.enabled = false; // six failures in a row: not the breaker's test
    let proxy = start(c).await;
    let client = client();

    // Retried three times and given up on: marked, on both paths, with the upstream's reply.
    upstream.set_behavior(Behavior::openai_error(503));
    let r = call(&client, chat(&proxy, "sk-test", "given up")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.should_retry(), Some("false"));
    assert_eq!(
        r.header("x-embedcar-error"),
        None,
        "the upstream's own reply"
    );
    assert_eq!(r.json()["error"]["type"], "server_error");
    assert_eq!(upstream.request_count(), 3, "three attempts");
    // A merged call keeps trying while its callers have time (here 3 s): at least the
    // client's own three attempts, then marked.
    let r = call(
        &client,
        with_headers(
            embedding(&proxy, "sk-test", "given up"),
            &[("x-stainless-read-timeout", "3")],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.should_retry(), Some("false"));
    let embedding_attempts = upstream.request_count() - 3;
    assert!(embedding_attempts >= 3, "{embedding_attempts} attempts");

    // Answers, not failures: one attempt, no mark.
    upstream.set_behavior(Behavior::Normal);
    assert_vector(
        &call(&client, embedding(&proxy, "sk-test", "ok")).await,
        "ok",
    );
    let r = call(&client, chat(&proxy, "sk-test", "ok")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.should_retry(), None);
    for status in [400, 401, 404, 422] {
        upstream.set_behavior(Behavior::openai_error(status));
        let before = upstream.request_count();
        let r = call(&client, chat(&proxy, "sk-test", "refused")).await;
        assert_eq!(r.status.as_u16(), status);
        assert_eq!(r.should_retry(), None, "{status}");
        let r = call(
            &client,
            embedding(&proxy, "sk-test", &format!("refused {status}")),
        )
        .await;
        assert_eq!(r.status.as_u16(), status);
        assert_eq!(r.should_retry(), None, "{status}");
        assert_eq!(
            upstream.request_count(),
            before + 2,
            "{status}: not retried"
        );
    }
    assert_eq!(
        metric_sum(&proxy, "embedcar_retries_total").await,
        (2 + embedding_attempts - 1) as f64
    );
}

#[tokio::test]
async fn with_the_header_turned_off_given_up_failures_are_not_marked() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::openai_error(503));
    let mut c = config(&upstream.url());
    c.retry.should_retry_header = false;
    let proxy = start(c).await;
    let r = call(&client(), pass_through(&proxy, "sk-test")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.should_retry(), None);
    assert_eq!(upstream.request_count(), 3, "still retried");
}

#[tokio::test]
async fn a_body_too_large_to_keep_gets_one_attempt_and_is_left_for_the_client_to_retry() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::openai_error(503));
    let mut c = config(&upstream.url());
    c.retry.max_buffered_body = 1024;
    let proxy = start(c).await;
    let req = Request::post(format!("{}/v1/files", proxy.url()))
        .header("authorization", "Bearer sk-test")
        .body(embedcar::body::full(vec![b'x'; 4096]))
        .unwrap();
    let r = call(&client(), req).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.should_retry(), None, "embedcar did not retry it");
    assert_eq!(upstream.request_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// 8. Queue bounds: shed at once, with Retry-After
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_queued_inputs_embeddings_callers_are_shed_at_once() {
    let upstream = FakeUpstream::start().await;
    let mut c = config(&upstream.url());
    c.limits.max_concurrency = 1;
    c.limits.max_queued_inputs = 10;
    let proxy = start(c).await;
    let client = client();
    let held = hold_slots(&proxy, &upstream, 1).await;

    let input = |i: usize| format!("queued {i}");
    let queued: Vec<_> = (0..10)
        .map(|i| spawn_call(&client, embedding(&proxy, "sk-test", &input(i))))
        .collect();
    wait_metric_until(&proxy, QUEUE_DEPTH, |d| d == 10.0).await;

    let two = json!({"model": MODEL, "input": ["over 1", "over 2"]});
    for req in [
        embedding(&proxy, "sk-test", "one too many"),
        post_json(&format!("{}/v1/embeddings", proxy.url()), &two),
        // Another credential shares the bound: it is a bound on embedcar's memory.
        embedding(&proxy, "sk-other", "another tenant"),
    ] {
        let r = call(&client, req).await;
        r.assert_own_error(StatusCode::SERVICE_UNAVAILABLE, "queue_full");
        // At once: not after waiting in the queue for the held slot (released only below).
        assert!(r.took < Duration::from_secs(5), "{:?}", r.took);
        assert_eq!(r.retry_after(), Some(1));
    }
    assert_eq!(metric(&proxy, &shed("queue_full")).await, 3.0);

    held.release().await;
    for (i, r) in join_all(queued).await.iter().enumerate() {
        assert_vector(r, &input(i));
    }
    let seen: HashSet<String> = upstream
        .requests()
        .iter()
        .filter(|r| r.path() == "/v1/embeddings")
        .flat_map(|r| parse_embedding_input(&r.json().unwrap()["input"]).unwrap())
        .map(|i| format!("{i:?}"))
        .collect();
    assert_eq!(seen.len(), 10, "the shed inputs were never sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_waiting_requests_pass_through_callers_are_shed_at_once() {
    let upstream = FakeUpstream::start().await;
    let mut c = config(&upstream.url());
    c.limits.max_concurrency = 1;
    c.limits.max_waiting_requests = 2;
    c.limits.max_wait = Duration::from_secs(10);
    let proxy = start(c).await;
    let client = client();
    let held = hold_slots(&proxy, &upstream, 1).await;

    let waiting: Vec<_> = (0..2)
        .map(|_| spawn_call(&client, pass_through(&proxy, "sk-test")))
        .collect();
    wait_metric_until(&proxy, REQUESTS_IN_FLIGHT, |n| n == 3.0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let r = call(&client, pass_through(&proxy, "sk-test")).await;
    r.assert_own_error(StatusCode::SERVICE_UNAVAILABLE, "queue_full");
    // At once: not after limits.max_wait (10 s) for the held slot.
    assert!(r.took < Duration::from_secs(5), "{:?}", r.took);
    assert_eq!(r.retry_after(), Some(1));
    assert_eq!(metric(&proxy, &shed("queue_full")).await, 1.0);

    held.release().await;
    for r in join_all(waiting).await {
        assert_eq!(r.status, StatusCode::OK);
    }
    // The shed one never reached the upstream: the holding stream and the two waiters did.
    assert_eq!(upstream.request_count(), 3);
}
