//! A fake OpenAI upstream for embedcar's tests, benchmarks and local experiments.
//!
//! Why a hand-written fake and not a mock library: embedcar is a proxy, so what we need to observe
//! is the *wire* — which requests reached the upstream, with which headers and bodies, how many at
//! once, over how many connections, and how the proxy copes when the upstream is slow, fails,
//! hangs, drops the connection or streams. A real HTTP server on `127.0.0.1:0` gives us all of
//! that, speaks HTTP/1.1 and h2c like the real thing, and is fast enough to benchmark against.
//!
//! The crate does not depend on embedcar: embedcar's integration tests and benchmarks use it as
//! a library, and its binary (`src/main.rs`, `cargo run -p fake-openai -- --port 0`) is the
//! same fake as a process, which separate processes (a Python test, a load generator, the quick
//! start) drive.
//!
//! # What it serves
//!
//! * `POST /v1/embeddings` and `POST /openai/deployments/{deployment}/embeddings` (Azure): real
//!   OpenAI-shaped replies. Every vector is [`expected_embedding`] of its input, so a test can
//!   check a proxied (batched, cached, re-encoded) answer input by input.
//! * `GET /v1/models`: a short model list.
//! * `POST /v1/chat/completions` (and the Azure twin): JSON, or a real, incrementally written SSE
//!   stream when `"stream": true`.
//! * Anything else, any method: an echo that streams the request body back as it arrives, with
//!   `x-fake-method` / `x-fake-path` headers, so pass-through tests can see exactly what arrived.
//! * `GET /__fake/stats` and `POST /__fake/reset`: counters for out-of-process users (see
//!   [`CONTROL_PREFIX`]). These are neither recorded nor subject to behaviours.
//!
//! # Steering it
//!
//! In order of precedence (first match wins):
//!
//! 1. per-request headers (`x-fake-delay-ms`, `x-fake-status`, `x-fake-retry-after`,
//!    `x-fake-hang`, `x-fake-drop`, `x-fake-malformed`, scoped by `x-fake-times` +
//!    `x-fake-key`; `x-fake-header` adds reply headers) — these travel with the request, so
//!    concurrent tests and other processes stay independent. See [`headers`].
//! 2. [`Rule`]s pushed with [`FakeUpstream::push_rule`], consumed in order.
//! 3. the default [`Behavior`] set with [`FakeUpstream::set_behavior`].
#![allow(clippy::new_without_default)]

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

type InnerBody = UnsyncBoxBody<Bytes, FakeError>;

/// Paths under this prefix are the fake's own control plane, not part of the OpenAI surface:
/// `GET /__fake/stats` returns the counters as JSON and `POST /__fake/reset` calls
/// [`FakeUpstream::reset_stats`]. They exist so that a benchmark or a Python test talking to the
/// example binary can read "how many upstream embeddings calls did the proxy make" without
/// sharing memory with it. They are not recorded and ignore behaviours, rules and headers.
pub const CONTROL_PREFIX: &str = "/__fake/";

/// Names of the request headers that steer a single request. They are matched case-insensitively
/// (HTTP header names are) and are recorded like any other header.
pub mod headers {
    /// `x-fake-delay-ms: N` — wait N ms before answering (then answer normally, or as the other
    /// headers say).
    pub const DELAY_MS: &str = "x-fake-delay-ms";
    /// `x-fake-status: NNN` — answer NNN with an OpenAI-shaped error body.
    pub const STATUS: &str = "x-fake-status";
    /// `x-fake-retry-after: S` — add `retry-after: S` to an `x-fake-status` reply.
    pub const RETRY_AFTER: &str = "x-fake-retry-after";
    /// `x-fake-hang: 1` — never answer (the handler is dropped when the client goes away).
    pub const HANG: &str = "x-fake-hang";
    /// `x-fake-drop: 1` — close the connection (HTTP/2: reset the stream) without a response.
    pub const DROP: &str = "x-fake-drop";
    /// `x-fake-malformed: 1` — answer 200 with a truncated JSON body.
    pub const MALFORMED: &str = "x-fake-malformed";
    /// `x-fake-times: N` — apply the overrides above only to the first N requests that carry the
    /// same `x-fake-key`; later ones fall through to rules and the default behaviour. This is how
    /// a separate process says "fail twice, then succeed" even though a retrying proxy forwards
    /// the same headers on every attempt.
    pub const TIMES: &str = "x-fake-times";
    /// `x-fake-key: K` — the counter `x-fake-times` uses (default: the empty key). Use a unique
    /// key per test so concurrent tests do not consume each other's budget.
    pub const KEY: &str = "x-fake-key";
    /// `x-fake-header: name: value` (repeatable) — add this header to whatever reply is sent
    /// (e.g. `x-ratelimit-remaining-requests: 0` on a 200). Does not count as an override.
    pub const HEADER: &str = "x-fake-header";
}

/// Options fixed at start-up.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Vector length when the request has no `dimensions`. Small by default so float JSON stays
    /// cheap in tests and benchmarks; pass `dimensions` to test realistic sizes.
    pub dims: usize,
    /// Serve at most this many connections at once. A permit is taken *before* `accept`, so extra
    /// connections complete the TCP handshake but then sit in the kernel backlog, unserved, like
    /// an upstream (or a server-side proxy) that only handles N connections. Note that a client
    /// keeping idle keep-alive connections holds permits: requests it sends on connections
    /// beyond the cap wait until one of the served connections closes.
    pub max_connections: Option<usize>,
    /// Number of `chat.completion.chunk` events in a streamed chat reply.
    pub stream_chunks: usize,
    /// Pause between two chunks of a streamed chat reply (the first is sent at once).
    pub stream_interval: Duration,
    /// Keep a [`Recorded`] copy of every request. Turn off for long benchmarks: the log grows
    /// without bound (the example binary turns it off, since nobody could read it there).
    pub record_requests: bool,
    /// Reject embeddings requests with more inputs than this (OpenAI's limit is 2048), so tests
    /// catch a proxy that merges too many inputs into one call.
    pub max_inputs: usize,
    /// Reject any single embeddings input above this many tokens, counted by
    /// [`fake_token_count`] (OpenAI's per-input limit is 8192). Lets tests exercise "one bad
    /// input in a merged batch".
    pub max_input_tokens: usize,
    /// Reject embeddings requests whose inputs add up to more tokens than this (OpenAI: 300 000).
    pub max_request_tokens: usize,
    /// Work on at most this many embeddings calls at once, like a model server with a fixed
    /// number of workers (Ollama's `OLLAMA_NUM_PARALLEL`, text-embeddings-inference's
    /// `max-concurrent-requests`). What happens to the rest is `over_capacity`. Unlike
    /// `max_connections`, idle connections cost nothing here: it counts calls being worked on.
    pub capacity: Option<usize>,
    pub over_capacity: OverCapacity,
    /// Random faults on embeddings calls (the share of calls that get each).
    pub faults: FaultMix,
    /// Bill OpenAI's models with their real tokenizer ([`billed_tokens`]); off, every model is
    /// billed with [`fake_token_count`]. The CPU benchmarks turn it off: the fake shares a core
    /// with their load generator, and a proxy that counts tokens itself ignores the bill.
    pub exact_usage: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            dims: 8,
            max_connections: None,
            stream_chunks: 5,
            stream_interval: Duration::from_millis(10),
            record_requests: true,
            max_inputs: 2048,
            max_input_tokens: 8192,
            max_request_tokens: 300_000,
            exact_usage: true,
            capacity: None,
            over_capacity: OverCapacity::Queue,
            faults: FaultMix::default(),
        }
    }
}

/// What a model server does with a call beyond its capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverCapacity {
    /// Queue it (Ollama, vLLM): it waits for a worker, its latency grows.
    #[default]
    Queue,
    /// Refuse it at once with 429 "Model is overloaded" (text-embeddings-inference).
    Refuse,
}

/// Shares (0 to 1) of embeddings calls that fail each way, drawn at random per call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultMix {
    /// 429 with `retry-after-ms: 200`.
    pub rate_limited: f64,
    /// 503.
    pub unavailable: f64,
    /// The connection closes without a reply.
    pub dropped: f64,
    /// 200 with a body cut off mid-way.
    pub truncated: f64,
    /// No answer, ever.
    pub hang: f64,
}

impl FaultMix {
    /// `429=0.2,503=0.1,drop=0.05,truncate=0.05,hang=0.2` (the example binary's `--faults`).
    pub fn parse(text: &str) -> Result<FaultMix, String> {
        let mut mix = FaultMix::default();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, share) = part
                .split_once('=')
                .ok_or_else(|| format!("{part}: want NAME=SHARE"))?;
            let share: f64 = share
                .trim()
                .parse()
                .map_err(|_| format!("{part}: the share is not a number"))?;
            let slot = match name.trim() {
                "429" => &mut mix.rate_limited,
                "503" => &mut mix.unavailable,
                "drop" => &mut mix.dropped,
                "truncate" => &mut mix.truncated,
                "hang" => &mut mix.hang,
                other => {
                    return Err(format!(
                        "{other}: not one of 429, 503, drop, truncate, hang"
                    ))
                }
            };
            *slot = share;
        }
        Ok(mix)
    }

    fn is_empty(&self) -> bool {
        *self == FaultMix::default()
    }

    /// The action for one call, from a uniform draw in [0, 1).
    fn pick(&self, draw: f64) -> Option<Action> {
        let mut edge = 0.0;
        let choices = [
            (self.rate_limited, 429u16),
            (self.unavailable, 503),
            (self.dropped, 1),
            (self.truncated, 2),
            (self.hang, 3),
        ];
        for (share, what) in choices {
            edge += share;
            if draw < edge {
                return Some(match what {
                    1 => Action::Drop,
                    2 => Action::Cut,
                    3 => Action::Hang,
                    status => {
                        let mut headers =
                            vec![("content-type".to_string(), "application/json".to_string())];
                        if status == 429 {
                            headers.push(("retry-after-ms".to_string(), "200".to_string()));
                        }
                        Action::Status {
                            status,
                            headers,
                            body: Bytes::from(forced_error_body(status)),
                        }
                    }
                });
            }
        }
        None
    }
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as received (origin form, the same for HTTP/1.1 and HTTP/2: the
    /// HTTP/2 `:authority` is in `authority`, an HTTP/1.1 host in the `host` header).
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The full body once received. While a body is still arriving (or if the client gave up)
    /// this holds what arrived so far and `body_complete` is false.
    pub body: Bytes,
    pub version: Version,
    /// Whether `body` is the whole body.
    pub body_complete: bool,
    /// The authority of the request target when the request carried one (HTTP/2 `:authority`,
    /// or an absolute-form HTTP/1.1 target); `None` for an ordinary HTTP/1.1 request.
    pub authority: Option<http::uri::Authority>,
}

impl Recorded {
    /// The request path, without the query.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// A header as a string, if present and valid UTF-8/ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// What the fake does with a request that no header override or rule claims.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Behavior {
    /// Answer as the endpoint normally does.
    #[default]
    Normal,
    /// Wait, then answer normally. Uses tokio's clock, so paused-time tests work.
    Delay(Duration),
    /// Answer exactly this: status, headers and body (content-type `application/json` is added
    /// when the headers have none and the body is not empty). See [`Behavior::openai_error`].
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Read the request, then never answer. The handler is dropped when the client goes away
    /// (or the fake shuts down), so `in_flight` falls back.
    Hang,
    /// Read the request, then close the connection without a response (HTTP/2: reset the
    /// stream), like an upstream that crashes or a load balancer that cuts the connection.
    Drop,
    /// `200 OK`, `application/json`, correct framing, but the JSON is cut in half.
    Malformed,
    /// `200 OK` and the first part of the body, then the connection breaks (HTTP/2: the stream
    /// is reset): a reply cut off mid-way.
    Cut,
    /// Answer normally, adding these headers (e.g. `x-ratelimit-remaining-requests: 0`).
    Headers(Vec<(String, String)>),
}

impl Behavior {
    /// A `Status` reply with OpenAI's error shape and the `type`/`code` OpenAI uses for this
    /// status (429 → `rate_limit_exceeded`, 5xx → `server_error`, ...).
    pub fn openai_error(status: u16) -> Behavior {
        Behavior::Status {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: String::from_utf8(forced_error_body(status)).expect("JSON is UTF-8"),
        }
    }

    /// Adds a reply header: to a `Status` reply's headers, or turns `Normal`/`Headers` into
    /// `Headers`. For `Delay`, `Hang`, `Drop` and `Malformed` the header is ignored (use a
    /// `Status` for a delayed error, or per-request `x-fake-header`).
    pub fn with_header(self, name: &str, value: &str) -> Behavior {
        let pair = (name.to_string(), value.to_string());
        match self {
            Behavior::Status {
                status,
                mut headers,
                body,
            } => {
                headers.push(pair);
                Behavior::Status {
                    status,
                    headers,
                    body,
                }
            }
            Behavior::Normal => Behavior::Headers(vec![pair]),
            Behavior::Headers(mut h) => {
                h.push(pair);
                Behavior::Headers(h)
            }
            other => other,
        }
    }
}

/// A limited override, checked before the default behaviour. Rules are kept in a queue; each
/// request takes the first rule whose `path_contains` matches its path (rules that do not match
/// are skipped, not consumed), uses its behaviour and decrements `times`; a rule is removed when
/// `times` reaches 0. A request steered by `x-fake-*` headers does not consume rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub behavior: Behavior,
    pub times: usize,
    /// Only requests whose path contains this string match (`None`: every request).
    pub path_contains: Option<String>,
}

impl Rule {
    /// The next matching request gets `behavior`.
    pub fn once(behavior: Behavior) -> Rule {
        Rule::repeat(behavior, 1)
    }

    /// The next `times` matching requests get `behavior`.
    pub fn repeat(behavior: Behavior, times: usize) -> Rule {
        Rule {
            behavior,
            times,
            path_contains: None,
        }
    }

    /// Restricts the rule to paths containing `fragment` (e.g. `"/embeddings"`).
    pub fn on_path(mut self, fragment: &str) -> Rule {
        self.path_contains = Some(fragment.to_string());
        self
    }
}

/// One embeddings input, as the API accepts it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EmbeddingInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl From<&str> for EmbeddingInput {
    fn from(s: &str) -> Self {
        EmbeddingInput::Text(s.to_string())
    }
}

impl From<String> for EmbeddingInput {
    fn from(s: String) -> Self {
        EmbeddingInput::Text(s)
    }
}

impl From<Vec<u32>> for EmbeddingInput {
    fn from(t: Vec<u32>) -> Self {
        EmbeddingInput::Tokens(t)
    }
}

/// The vector the fake returns for one input: deterministic, a pure function of (input, dims),
/// values in [-1, 1], finite, not all equal. Tests compare proxied results with this.
///
/// How: FNV-1a over the input (text and token arrays are hashed in separate domains, so `"1"`
/// and `[1]` differ) seeds a splitmix64 stream; each component is uniform in [-1, 1) and the
/// vector is scaled to unit length like OpenAI's (so cosine similarity behaves). Only exactly
/// rounded IEEE operations are used, so the result is the same on every platform. Because the
/// scaling is the last step, a shorter `dims` gives a re-normalised prefix of a longer one, as
/// OpenAI's `dimensions` parameter does.
pub fn expected_embedding(input: &EmbeddingInput, dims: usize) -> Vec<f32> {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut feed = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    };
    match input {
        EmbeddingInput::Text(s) => {
            feed(b'T');
            s.bytes().for_each(&mut feed);
        }
        EmbeddingInput::Tokens(t) => {
            feed(b'K');
            t.iter().flat_map(|x| x.to_le_bytes()).for_each(&mut feed);
        }
    }
    // Two 24-bit components per splitmix64 word, each exactly `k / 2^23 - 1` in [-1, 1), then
    // one multiplication by the reciprocal norm: cheap, because the benchmarks run this fake on
    // one core beside their load generator, at tens of thousands of vectors a second.
    let unit = |bits: u64| bits as f32 * (1.0 / (1u32 << 23) as f32) - 1.0;
    let mut state = h;
    let mut raw: Vec<f32> = Vec::with_capacity(dims + 1);
    while raw.len() < dims {
        let x = splitmix64(&mut state);
        raw.push(unit(x >> 40));
        raw.push(unit((x >> 16) & 0xff_ffff));
    }
    raw.truncate(dims);
    let norm = raw
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    let mut out = raw;
    if norm > 0.0 {
        let inverse = 1.0 / norm;
        for v in &mut out {
            *v = (f64::from(*v) * inverse) as f32;
        }
    }
    // Guarantee "not all equal" for dims >= 2 (astronomically unlikely to trigger).
    if out.len() >= 2 && out.iter().all(|v| *v == out[0]) {
        out[0] = if out[0] == 0.0 { 0.5 } else { -out[0] };
    }
    out
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Tokens the fake bills for `input` under `model`: like OpenAI, cl100k_base for OpenAI's
/// embedding models (so a proxy's exact per-caller usage can be compared with the direct
/// reply), and [`fake_token_count`]'s word count for any other model (a tokenizer the proxy
/// cannot know, as with an OpenAI-compatible server's own models).
pub fn billed_tokens(model: &str, input: &EmbeddingInput) -> u32 {
    match input {
        EmbeddingInput::Text(s)
            if model.contains("text-embedding-3") || model.contains("text-embedding-ada-002") =>
        {
            let n = tiktoken_rs::cl100k_base_singleton()
                .encode_ordinary(s)
                .len();
            n.min(u32::MAX as usize) as u32
        }
        _ => fake_token_count(input),
    }
}

/// Count "tokens" the fake's way for models it has no tokenizer for (whitespace-separated words
/// for text, length for token arrays; at least 1). Not a real tokenizer on purpose: tests that
/// check the proxy's own usage accounting need to tell the two apart.
pub fn fake_token_count(input: &EmbeddingInput) -> u32 {
    let n = match input {
        EmbeddingInput::Text(s) => s.split_whitespace().count(),
        EmbeddingInput::Tokens(t) => t.len(),
    };
    n.max(1).min(u32::MAX as usize) as u32
}

/// Parses an embeddings request's `input` the way the fake (and OpenAI) accept it: a string, an
/// array of strings, an array of token ids, or an array of token-id arrays. Empty strings, empty
/// arrays, mixed arrays and non-u32 numbers are errors. The error is a message for a 400.
pub fn parse_embedding_input(input: &Value) -> Result<Vec<EmbeddingInput>, String> {
    const BAD: &str = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.";
    let token = |v: &Value| {
        v.as_u64()
            .filter(|n| *n <= u64::from(u32::MAX))
            .map(|n| n as u32)
    };
    match input {
        Value::String(s) if !s.is_empty() => Ok(vec![EmbeddingInput::Text(s.clone())]),
        Value::Array(items) if !items.is_empty() => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(EmbeddingInput::Text(s.clone())),
                    _ => Err(BAD.to_string()),
                })
                .collect(),
            Value::Number(_) => items
                .iter()
                .map(|v| token(v).ok_or_else(|| BAD.to_string()))
                .collect::<Result<Vec<u32>, String>>()
                .map(|t| vec![EmbeddingInput::Tokens(t)]),
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(inner) if !inner.is_empty() => inner
                        .iter()
                        .map(|v| token(v).ok_or_else(|| BAD.to_string()))
                        .collect::<Result<Vec<u32>, String>>()
                        .map(EmbeddingInput::Tokens),
                    _ => Err(BAD.to_string()),
                })
                .collect(),
            _ => Err(BAD.to_string()),
        },
        _ => Err(BAD.to_string()),
    }
}

/// Standard base64 (RFC 4648 alphabet, with `=` padding), as OpenAI uses for
/// `encoding_format: "base64"`. Hand-rolled because `base64` is not a dependency of the crate.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets = |n: u32| {
        [
            ALPHABET[(n >> 18) as usize & 63],
            ALPHABET[(n >> 12) as usize & 63],
            ALPHABET[(n >> 6) as usize & 63],
            ALPHABET[n as usize & 63],
        ]
    };
    // Bytes, not chars (pushing a `char` encodes it as UTF-8 each time), and whole 3-byte groups
    // without per-byte checks: the benchmarks run this fake on one core beside their load
    // generator, at tens of thousands of 6 KiB vectors a second.
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    let mut groups = data.chunks_exact(3);
    for g in &mut groups {
        let n = (u32::from(g[0]) << 16) | (u32::from(g[1]) << 8) | u32::from(g[2]);
        out.extend_from_slice(&sextets(n));
    }
    match *groups.remainder() {
        [a] => {
            let s = sextets(u32::from(a) << 16);
            out.extend_from_slice(&[s[0], s[1], b'=', b'=']);
        }
        [a, b] => {
            let s = sextets((u32::from(a) << 16) | (u32::from(b) << 8));
            out.extend_from_slice(&[s[0], s[1], s[2], b'=']);
        }
        _ => {}
    }
    String::from_utf8(out).expect("the base64 alphabet is ASCII")
}

/// Strict inverse of [`base64_encode`]: `None` on a bad length, a bad character or bad padding.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.as_bytes();
    if s.len() & 3 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, q) in s.chunks(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for c in &q[..4 - pad] {
            n = (n << 6) | val(*c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Decodes one `embedding` value from a reply: a float array, or a base64 string of
/// little-endian f32. `None` if it is neither (or a float does not fit f32 exactly-ish).
pub fn decode_embedding(v: &Value) -> Option<Vec<f32>> {
    match v {
        Value::Array(items) => items.iter().map(|x| x.as_f64().map(|f| f as f32)).collect(),
        Value::String(s) => {
            let bytes = base64_decode(s)?;
            if bytes.len() % 4 != 0 {
                return None;
            }
            Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The server handle
// ---------------------------------------------------------------------------------------------

/// A running fake upstream. Dropping it stops accepting, closes every connection and ends every
/// pending handler (hanging, delayed or held ones included).
pub struct FakeUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl fmt::Debug for FakeUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // Every connection task and every waiting handler selects on this channel.
        self.shutdown.send_replace(true);
        self.accept.abort();
    }
}

impl FakeUpstream {
    /// Starts on `127.0.0.1:0` with default options.
    pub async fn start() -> FakeUpstream {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts on `127.0.0.1:0` with `opts`.
    pub async fn start_with(opts: FakeOptions) -> FakeUpstream {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), opts)
            .await
            .expect("bind fake upstream on 127.0.0.1:0")
    }

    /// Starts on a given address (the example binary uses this for `--host`/`--port`).
    pub async fn bind(addr: SocketAddr, opts: FakeOptions) -> std::io::Result<FakeUpstream> {
        // The billing tokenizer's tables load once per process, in about a second: here, off
        // the runtime's workers, rather than inside the first billed reply, where the stall
        // would be taken for a slow upstream (and trip a test's short first-byte timeout).
        let _ = tokio::task::spawn_blocking(tiktoken_rs::cl100k_base_singleton).await;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (streams, _) = watch::channel(StreamGate::default());
        let limit = opts.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        let workers = opts.capacity.map(|n| Arc::new(Semaphore::new(n)));
        let shared = Arc::new(Shared {
            opts,
            behavior: Mutex::new(Behavior::Normal),
            rules: Mutex::new(VecDeque::new()),
            records: Mutex::new(Records::default()),
            keyed: Mutex::new(HashMap::new()),
            request_count: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            body_bytes: AtomicU64::new(0),
            embedding_calls: AtomicUsize::new(0),
            embedding_inputs: AtomicUsize::new(0),
            over_capacity_refused: AtomicUsize::new(0),
            over_capacity_queued: AtomicUsize::new(0),
            workers,
            draw: AtomicU64::new(0x2545_F491_4F6C_DD1D),
            next_id: AtomicU64::new(0),
            streams,
            shutdown: shutdown_rx,
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let accept = tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            limit,
            Arc::new(builder),
        ));
        Ok(FakeUpstream {
            shared,
            addr,
            shutdown,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash, no `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The behaviour for requests that no header override or rule claims, from now on.
    pub fn set_behavior(&self, b: Behavior) {
        *lock(&self.shared.behavior) = b;
    }

    /// Queues a limited override (see [`Rule`]).
    pub fn push_rule(&self, r: Rule) {
        if r.times > 0 {
            lock(&self.shared.rules).push_back(r);
        }
    }

    /// Removes every queued rule.
    pub fn clear_rules(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Rules not yet used up (e.g. to assert that a retry consumed them).
    pub fn pending_rules(&self) -> Vec<Rule> {
        lock(&self.shared.rules).iter().cloned().collect()
    }

    /// Every request received (except the control plane), in order of arrival of the head.
    /// Empty when `record_requests` is off.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.records).list.clone()
    }

    /// Requests received since start or the last [`reset_stats`](Self::reset_stats), counted
    /// even when recording is off.
    pub fn request_count(&self) -> usize {
        self.shared.request_count.load(Ordering::SeqCst)
    }

    /// The most requests that were in flight at once: from the moment a request head is
    /// received until its response body has been written (or the exchange was abandoned).
    pub fn peak_concurrency(&self) -> usize {
        self.shared.peak.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Request body bytes received so far, summed over all requests, updated per body frame as
    /// it arrives (not when the body ends), so a test can tell that a proxy streams a request
    /// body instead of buffering it.
    pub fn body_bytes_received(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
    }

    /// Embeddings requests answered with real embeddings (2xx). Errors, forced statuses,
    /// malformed replies, hangs and drops do not count.
    /// Embeddings calls refused (429) for want of capacity.
    pub fn over_capacity_refused(&self) -> usize {
        self.shared.over_capacity_refused.load(Ordering::SeqCst)
    }

    /// Embeddings calls that had to queue for a worker.
    pub fn over_capacity_queued(&self) -> usize {
        self.shared.over_capacity_queued.load(Ordering::SeqCst)
    }

    pub fn embedding_calls(&self) -> usize {
        self.shared.embedding_calls.load(Ordering::SeqCst)
    }

    /// Total inputs across the calls counted by [`embedding_calls`](Self::embedding_calls).
    pub fn embedding_inputs(&self) -> usize {
        self.shared.embedding_inputs.load(Ordering::SeqCst)
    }

    /// While true, a streamed chat reply sends every chunk but the last and then waits for
    /// [`release_streams`](Self::release_streams) (or for `hold_streams(false)`). Lets a test
    /// catch a proxy mid-stream: e.g. check that the first chunks already reached the client.
    pub fn hold_streams(&self, hold: bool) {
        self.shared.streams.send_modify(|g| g.hold = hold);
    }

    /// Releases every held stream that started before this call, including streams that have
    /// not reached their last chunk yet (so there is no race between a test's release and a
    /// slow stream). Streams that start afterwards are held again while `hold_streams` is true.
    pub fn release_streams(&self) {
        self.shared.streams.send_modify(|g| g.generation += 1);
    }

    /// Zeroes the counters and clears the request log. `peak_concurrency` restarts from the
    /// current `in_flight`. Behaviour, rules and held streams are left alone.
    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }

    /// Polls `cond` every millisecond until it holds or `timeout` passes; returns whether it
    /// held. Handy for "wait until the proxy has sent N requests". The timeout is measured in
    /// real time, not tokio's clock: under paused time tokio would skip ahead while the network
    /// is busy and give up early (the polling sleeps then return at once, so it spins; fine for
    /// a test).
    pub async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

struct Shared {
    opts: FakeOptions,
    behavior: Mutex<Behavior>,
    rules: Mutex<VecDeque<Rule>>,
    records: Mutex<Records>,
    /// `x-fake-key` -> how many times its overrides were applied.
    keyed: Mutex<HashMap<String, usize>>,
    request_count: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    body_bytes: AtomicU64,
    embedding_calls: AtomicUsize,
    embedding_inputs: AtomicUsize,
    /// Embeddings calls refused or queued for want of capacity.
    over_capacity_refused: AtomicUsize,
    over_capacity_queued: AtomicUsize,
    /// Workers for `capacity`.
    workers: Option<Arc<Semaphore>>,
    /// State of the fault draw (xorshift).
    draw: AtomicU64,
    next_id: AtomicU64,
    streams: watch::Sender<StreamGate>,
    shutdown: watch::Receiver<bool>,
}

#[derive(Clone, Copy, Default, Debug)]
struct StreamGate {
    hold: bool,
    generation: u64,
}

/// The request log. `epoch` changes on reset so that a body arriving after a reset does not
/// land in the wrong slot.
#[derive(Default)]
struct Records {
    epoch: u64,
    list: Vec<Recorded>,
}

#[derive(Clone, Copy)]
struct Slot {
    epoch: u64,
    index: usize,
}

/// The path-and-query part of a request target, as a `Uri`.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if uri.scheme().is_some() || uri.authority().is_some() => Uri::from(pq.clone()),
        _ => uri.clone(),
    }
}

/// A poisoned lock only means another test thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn reset_stats(&self) {
        {
            let mut r = lock(&self.records);
            r.epoch += 1;
            r.list.clear();
        }
        self.request_count.store(0, Ordering::SeqCst);
        self.body_bytes.store(0, Ordering::SeqCst);
        self.embedding_calls.store(0, Ordering::SeqCst);
        self.embedding_inputs.store(0, Ordering::SeqCst);
        self.over_capacity_refused.store(0, Ordering::SeqCst);
        self.over_capacity_queued.store(0, Ordering::SeqCst);
        self.peak
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
        lock(&self.keyed).clear();
    }

    fn record_head(&self, parts: &http::request::Parts) -> Option<Slot> {
        if !self.opts.record_requests {
            return None;
        }
        let rec = Recorded {
            method: parts.method.clone(),
            uri: origin_form(&parts.uri),
            headers: parts.headers.clone(),
            body: Bytes::new(),
            version: parts.version,
            body_complete: false,
            authority: parts.uri.authority().cloned(),
        };
        let mut r = lock(&self.records);
        r.list.push(rec);
        Some(Slot {
            epoch: r.epoch,
            index: r.list.len() - 1,
        })
    }

    fn record_body(&self, slot: Option<Slot>, body: Bytes, complete: bool) {
        let Some(slot) = slot else { return };
        let mut r = lock(&self.records);
        if r.epoch == slot.epoch {
            if let Some(rec) = r.list.get_mut(slot.index) {
                rec.body = body;
                rec.body_complete = complete;
            }
        }
    }

    fn count_body_bytes(&self, n: usize) {
        self.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
    }

    /// Resolves what to do: header overrides, then rules, then the default behaviour.
    fn plan_for(&self, parts: &http::request::Parts) -> Plan {
        let h = &parts.headers;
        let mut extra = Vec::new();
        for v in h.get_all(headers::HEADER) {
            if let Some((k, v)) = v.to_str().ok().and_then(|s| s.split_once(':')) {
                extra.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        if let Some(mut plan) = self.header_override(h) {
            plan.extra_headers.extend(extra);
            return plan;
        }
        let from_rule = {
            let mut rules = lock(&self.rules);
            let path = parts.uri.path();
            let pos = rules.iter().position(|r| match &r.path_contains {
                Some(frag) => path.contains(frag.as_str()),
                None => true,
            });
            pos.map(|i| {
                let rule = &mut rules[i];
                rule.times -= 1;
                let b = rule.behavior.clone();
                if rule.times == 0 {
                    rules.remove(i);
                }
                b
            })
        };
        let behavior = from_rule.unwrap_or_else(|| lock(&self.behavior).clone());
        let mut plan = Plan::from_behavior(behavior);
        plan.extra_headers.extend(extra);
        plan
    }

    fn header_override(&self, h: &HeaderMap) -> Option<Plan> {
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let flag = |name: &str| text(name).is_some_and(|v| !matches!(v, "" | "0" | "false"));
        let delay = text(headers::DELAY_MS)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let status = text(headers::STATUS).and_then(|v| v.parse::<u16>().ok());
        let action = if flag(headers::DROP) {
            Action::Drop
        } else if flag(headers::HANG) {
            Action::Hang
        } else if let Some(status) = status.filter(|s| (200..=999).contains(s)) {
            let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
            if let Some(ra) = text(headers::RETRY_AFTER) {
                headers.push((RETRY_AFTER.as_str().to_string(), ra.to_string()));
            }
            Action::Status {
                status,
                headers,
                body: Bytes::from(forced_error_body(status)),
            }
        } else if flag(headers::MALFORMED) {
            Action::Malformed
        } else if delay.is_some() {
            Action::Normal
        } else {
            return None;
        };
        if let Some(times) = text(headers::TIMES).and_then(|v| v.parse::<usize>().ok()) {
            let key = text(headers::KEY).unwrap_or("").to_string();
            let mut keyed = lock(&self.keyed);
            let used = keyed.entry(key).or_insert(0);
            if *used >= times {
                return None;
            }
            *used += 1;
        }
        Some(Plan {
            delay,
            action,
            extra_headers: Vec::new(),
        })
    }

    /// A uniform draw in [0, 1) for the fault mix.
    fn next_draw(&self) -> f64 {
        let mut x = self.draw.load(Ordering::Relaxed);
        loop {
            let mut next = x;
            next ^= next << 13;
            next ^= next >> 7;
            next ^= next << 17;
            match self
                .draw
                .compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (next >> 11) as f64 / (1u64 << 53) as f64,
                Err(seen) => x = seen,
            }
        }
    }

    fn next_request_id(&self) -> String {
        format!(
            "req_fake_{}",
            self.next_id.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Resolves when the fake shuts down (or its handle is gone).
    async fn shutdown(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// What to do with one request, resolved once at arrival.
struct Plan {
    delay: Option<Duration>,
    action: Action,
    extra_headers: Vec<(String, String)>,
}

enum Action {
    Normal,
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    Hang,
    Drop,
    Malformed,
    Cut,
}

impl Plan {
    fn from_behavior(b: Behavior) -> Plan {
        let (delay, action, extra_headers) = match b {
            Behavior::Normal => (None, Action::Normal, Vec::new()),
            Behavior::Delay(d) => (Some(d), Action::Normal, Vec::new()),
            Behavior::Status {
                status,
                headers,
                body,
            } => (
                None,
                Action::Status {
                    status,
                    headers,
                    body: Bytes::from(body),
                },
                Vec::new(),
            ),
            Behavior::Hang => (None, Action::Hang, Vec::new()),
            Behavior::Drop => (None, Action::Drop, Vec::new()),
            Behavior::Malformed => (None, Action::Malformed, Vec::new()),
            Behavior::Cut => (None, Action::Cut, Vec::new()),
            Behavior::Headers(h) => (None, Action::Normal, h),
        };
        Plan {
            delay,
            action,
            extra_headers,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accept loop and connections
// ---------------------------------------------------------------------------------------------

type AutoBuilder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Option<Arc<Semaphore>>,
    builder: Arc<AutoBuilder>,
) {
    loop {
        // Permit first, accept second: connections beyond the cap stay in the kernel backlog.
        let permit = match &limit {
            Some(sem) => match sem.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            None => None,
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and friends under benchmark load: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut shutdown = shared.shutdown.clone();
            let svc_shared = shared.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { handle(shared, req).await }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection future closes the socket: that is "abort connections".
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
    }
}

/// The one error type of handlers and bodies. Returning it from a handler makes hyper close the
/// connection (HTTP/2: reset the stream) without writing a response, which is how `Drop`, and
/// shutdown during `Hang`, are implemented. A concrete type rather than a boxed `dyn Error`
/// because hyper's `Into<Box<dyn Error + Send + Sync>>` bound must hold for every lifetime.
#[derive(Debug)]
struct FakeError(String);

impl FakeError {
    fn new(what: impl Into<String>) -> FakeError {
        FakeError(what.into())
    }
}

impl fmt::Display for FakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fake upstream: {}", self.0)
    }
}

impl StdError for FakeError {}

impl From<hyper::Error> for FakeError {
    fn from(e: hyper::Error) -> Self {
        FakeError(e.to_string())
    }
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: Arc<Shared>) -> InFlight {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The response body type: any body, plus the in-flight guard, released when the body ends or
/// is dropped (hyper drops it once the last byte is written, or when the client goes away).
struct FakeBody {
    inner: InnerBody,
    guard: Option<InFlight>,
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = FakeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FakeError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn full(body: impl Into<Bytes>) -> InnerBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> InnerBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Route {
    Embeddings { deployment: Option<String> },
    Chat { deployment: Option<String> },
    Models,
    Echo,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        let azure = |suffix: &str| {
            path.strip_prefix("/openai/deployments/")
                .and_then(|rest| rest.strip_suffix(suffix))
                .filter(|d| !d.is_empty() && !d.contains('/'))
                .map(str::to_string)
        };
        if method == Method::POST {
            if path == "/v1/embeddings" {
                return Route::Embeddings { deployment: None };
            }
            if let Some(d) = azure("/embeddings") {
                return Route::Embeddings {
                    deployment: Some(d),
                };
            }
            if path == "/v1/chat/completions" {
                return Route::Chat { deployment: None };
            }
            if let Some(d) = azure("/chat/completions") {
                return Route::Chat {
                    deployment: Some(d),
                };
            }
        }
        if method == Method::GET && path == "/v1/models" {
            return Route::Models;
        }
        Route::Echo
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<FakeBody>, FakeError> {
    if req.uri().path().starts_with(CONTROL_PREFIX) {
        return Ok(control(&shared, &req).map(|inner| FakeBody { inner, guard: None }));
    }
    let guard = InFlight::enter(shared.clone());
    let started = Instant::now();
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    let request_id = shared.next_request_id();
    let (parts, body) = req.into_parts();
    let slot = shared.record_head(&parts);
    let mut plan = shared.plan_for(&parts);
    let route = Route::of(&parts.method, parts.uri.path());
    let is_embeddings = matches!(route, Route::Embeddings { .. });
    if is_embeddings && matches!(plan.action, Action::Normal) && !shared.opts.faults.is_empty() {
        if let Some(fault) = shared.opts.faults.pick(shared.next_draw()) {
            plan.action = fault;
        }
    }
    // A worker for the call, held until its answer is written (or it is dropped).
    let _worker = match (&shared.workers, is_embeddings) {
        (Some(workers), true) => match workers.clone().try_acquire_owned() {
            Ok(w) => Some(w),
            Err(_) if shared.opts.over_capacity == OverCapacity::Refuse => {
                shared.over_capacity_refused.fetch_add(1, Ordering::SeqCst);
                let body = openai_error_body("Model is overloaded", "overloaded", None, None);
                return Ok(
                    json_response(StatusCode::TOO_MANY_REQUESTS, body).map(|inner| FakeBody {
                        inner,
                        guard: Some(guard),
                    }),
                );
            }
            Err(_) => {
                shared.over_capacity_queued.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    w = workers.clone().acquire_owned() => w.ok(),
                    _ = shared.shutdown() => return Err(FakeError::new("shutting down")),
                }
            }
        },
        _ => None,
    };

    let mut resp = match plan.action {
        // The echo streams: it must not wait for the whole body.
        Action::Normal if route == Route::Echo => {
            delay(&shared, plan.delay).await?;
            echo(&shared, &parts, body, slot)
        }
        action => {
            let body = read_body(&shared, body, slot).await?;
            delay(&shared, plan.delay).await?;
            match action {
                Action::Normal => match route {
                    Route::Embeddings { deployment } => {
                        embeddings(&shared, &body, deployment.as_deref())
                    }
                    Route::Chat { deployment } => {
                        chat(&shared, &body, deployment.as_deref(), &request_id)
                    }
                    Route::Models => models(),
                    Route::Echo => unreachable!("handled above"),
                },
                Action::Status {
                    status,
                    headers,
                    body,
                } => {
                    let mut resp = Response::new(full(body.clone()));
                    *resp.status_mut() =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    add_headers(resp.headers_mut(), &headers);
                    if !body.is_empty() && !resp.headers().contains_key(CONTENT_TYPE) {
                        resp.headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    }
                    resp
                }
                Action::Hang => {
                    shared.shutdown().await;
                    return Err(FakeError::new("shutting down"));
                }
                Action::Drop => return Err(FakeError::new("dropping the connection")),
                Action::Malformed => json_response(
                    StatusCode::OK,
                    &b"{\"object\":\"list\",\"data\":[{\"object\":\"embedding\",\"index\":0,\"embedding\":[0.0123,-0.45"[..],
                ),
                Action::Cut => {
                    // The head and a first part go out; a moment later the reply breaks, so the
                    // client sees a body cut off, not a connection closed before any reply.
                    let frames = futures_util::stream::unfold(0u8, |step| async move {
                        match step {
                            0 => Some((
                                Ok(Frame::data(Bytes::from_static(
                                    b"{\"object\":\"list\",\"data\":[{",
                                ))),
                                1,
                            )),
                            1 => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Some((Err(FakeError::new("cutting the reply off")), 2))
                            }
                            _ => None,
                        }
                    });
                    let mut resp = Response::new(UnsyncBoxBody::new(StreamBody::new(frames)));
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    resp
                }
            }
        }
    };
    add_headers(resp.headers_mut(), &plan.extra_headers);
    let h = resp.headers_mut();
    // A rule's explicit x-request-id wins.
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.entry("x-request-id").or_insert(v);
    }
    h.insert(
        "openai-processing-ms",
        HeaderValue::from(started.elapsed().as_millis() as u64),
    );
    Ok(resp.map(|inner| FakeBody {
        inner,
        guard: Some(guard),
    }))
}

async fn delay(shared: &Shared, d: Option<Duration>) -> Result<(), FakeError> {
    if let Some(d) = d {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shared.shutdown() => return Err(FakeError::new("shutting down")),
        }
    }
    Ok(())
}

fn add_headers(h: &mut HeaderMap, pairs: &[(String, String)]) {
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
}

/// Reads the whole body, counting bytes frame by frame as they arrive, and records it.
async fn read_body(
    shared: &Shared,
    mut body: Incoming,
    slot: Option<Slot>,
) -> Result<Bytes, FakeError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let joined = |chunks: &mut Vec<Bytes>| -> Bytes {
        match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
                chunks.iter().for_each(|c| b.extend_from_slice(c));
                b.freeze()
            }
        }
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    shared.count_body_bytes(data.len());
                    chunks.push(data);
                }
            }
            Err(e) => {
                shared.record_body(slot, joined(&mut chunks), false);
                return Err(e.into());
            }
        }
    }
    let body = joined(&mut chunks);
    shared.record_body(slot, body.clone(), true);
    Ok(body)
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<InnerBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn openai_error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    }))
    .expect("serialize error")
}

fn invalid_request(message: &str, param: Option<&str>) -> Response<InnerBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        openai_error_body(message, "invalid_request_error", param, None),
    )
}

/// The error body of a forced status, with the `type`/`code` OpenAI uses for it.
fn forced_error_body(status: u16) -> Vec<u8> {
    let (kind, code, what) = match status {
        400 => ("invalid_request_error", None, "Bad request"),
        401 => (
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided",
        ),
        403 => ("permission_error", None, "Forbidden"),
        404 => ("invalid_request_error", None, "Not found"),
        408 => ("timeout", None, "Request timed out"),
        409 => ("conflict", None, "Conflict"),
        429 => (
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached. Please try again later.",
        ),
        503 => (
            "server_error",
            None,
            "The engine is currently overloaded, please try again later",
        ),
        s if s >= 500 => (
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
        _ => ("invalid_request_error", None, "Forced status"),
    };
    openai_error_body(
        &format!("{what} (fake upstream: forced status {status})"),
        kind,
        None,
        code,
    )
}

fn control(shared: &Shared, req: &Request<Incoming>) -> Response<InnerBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/__fake/stats") => {
            let stats = json!({
                "requests": shared.request_count.load(Ordering::SeqCst),
                "in_flight": shared.in_flight.load(Ordering::SeqCst),
                "peak_concurrency": shared.peak.load(Ordering::SeqCst),
                "body_bytes_received": shared.body_bytes.load(Ordering::SeqCst),
                "embedding_calls": shared.embedding_calls.load(Ordering::SeqCst),
                "embedding_inputs": shared.embedding_inputs.load(Ordering::SeqCst),
                "over_capacity_refused": shared.over_capacity_refused.load(Ordering::SeqCst),
                "over_capacity_queued": shared.over_capacity_queued.load(Ordering::SeqCst),
            });
            json_response(StatusCode::OK, serde_json::to_vec(&stats).expect("json"))
        }
        (&Method::POST, "/__fake/reset") => {
            shared.reset_stats();
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            openai_error_body(
                "unknown fake control endpoint",
                "invalid_request_error",
                None,
                None,
            ),
        ),
    }
}

// --- echo ----------------------------------------------------------------------------------------

fn echo(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: Incoming,
    slot: Option<Slot>,
) -> Response<InnerBody> {
    let body = EchoBody {
        inner: body,
        shared: shared.clone(),
        slot,
        seen: Vec::new(),
        done: false,
    };
    let mut resp = Response::new(body.boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        parts
            .headers
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(parts.method.as_str()) {
        h.insert("x-fake-method", v);
    }
    let pq = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    if let Ok(v) = HeaderValue::from_str(pq) {
        h.insert("x-fake-path", v);
    }
    resp
}

/// Streams the request body back frame by frame (trailers included), counting and recording
/// what passes through.
struct EchoBody {
    inner: Incoming,
    shared: Arc<Shared>,
    slot: Option<Slot>,
    seen: Vec<Bytes>,
    done: bool,
}

impl EchoBody {
    fn finish(&mut self, complete: bool) {
        self.done = true;
        if self.slot.is_some() {
            let mut b = BytesMut::with_capacity(self.seen.iter().map(Bytes::len).sum());
            self.seen.drain(..).for_each(|c| b.extend_from_slice(&c));
            self.shared.record_body(self.slot, b.freeze(), complete);
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = FakeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FakeError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.shared.count_body_bytes(data.len());
                    if this.slot.is_some() {
                        this.seen.push(data.clone());
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EchoBody {
    fn drop(&mut self) {
        if !self.done {
            // An empty body may never be polled: hyper sees is_end_stream() and drops it.
            let complete = self.inner.is_end_stream();
            self.finish(complete);
        }
    }
}

// --- models ----------------------------------------------------------------------------------

fn models() -> Response<InnerBody> {
    let ids = [
        "text-embedding-3-small",
        "text-embedding-3-large",
        "text-embedding-ada-002",
        "gpt-4o-mini",
    ];
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1, "owned_by": "openai"}))
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&json!({"object": "list", "data": data})).expect("json"),
    )
}

// --- embeddings ------------------------------------------------------------------------------

/// f32 (not f64) so serde_json writes the shortest text that parses back to the same f32.
enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

/// The embeddings reply, its envelope written by hand: a base64 vector is kilobytes of text
/// that needs no escaping, and serde_json's escape scan over it was a tenth of the benchmark
/// core. Floats, the model name and the usage still go through serde_json.
fn embeddings_body(values: Vec<EmbeddingValue>, model: &str, usage: &EmbeddingUsage) -> Vec<u8> {
    let room: usize = values
        .iter()
        .map(|v| match v {
            EmbeddingValue::Float(f) => f.len() * 12,
            EmbeddingValue::Base64(s) => s.len(),
        })
        .sum();
    let mut out = Vec::with_capacity(room + 64 * values.len() + 128);
    out.extend_from_slice(br#"{"object":"list","data":["#);
    for (index, value) in values.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write!(
            out,
            r#"{{"object":"embedding","index":{index},"embedding":"#
        )
        .expect("write to a Vec");
        match value {
            EmbeddingValue::Float(v) => serde_json::to_writer(&mut out, &v).expect("f32 JSON"),
            EmbeddingValue::Base64(s) => {
                out.push(b'"');
                out.extend_from_slice(s.as_bytes());
                out.push(b'"');
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"model":"#);
    serde_json::to_writer(&mut out, model).expect("a string is JSON");
    out.extend_from_slice(br#","usage":"#);
    serde_json::to_writer(&mut out, usage).expect("usage is JSON");
    out.push(b'}');
    out
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

fn embeddings(shared: &Shared, body: &[u8], deployment: Option<&str>) -> Response<InnerBody> {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return invalid_request("The request body must be a JSON object.", None),
        Err(e) => {
            return invalid_request(
                &format!("We could not parse the JSON body of your request. ({e})"),
                None,
            )
        }
    };
    let model = match (req.get("model"), deployment) {
        (Some(Value::String(m)), _) => m.as_str(),
        (None | Some(Value::Null), Some(d)) => d,
        (None | Some(Value::Null), None) => {
            return invalid_request("you must provide a model parameter", Some("model"))
        }
        _ => return invalid_request("'$.model' is invalid.", Some("model")),
    };
    let inputs = match req.get("input") {
        None | Some(Value::Null) => {
            return invalid_request("'input' is a required property", Some("input"))
        }
        Some(v) => match parse_embedding_input(v) {
            Ok(i) => i,
            Err(msg) => return invalid_request(&msg, Some("input")),
        },
    };
    let base64 = match req.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        _ => {
            return invalid_request(
                "'$.encoding_format' is invalid: expected 'float' or 'base64'.",
                Some("encoding_format"),
            )
        }
    };
    let dims = match req.get("dimensions") {
        None | Some(Value::Null) => shared.opts.dims,
        Some(v) => match v.as_u64().filter(|d| (1..=65_536).contains(d)) {
            Some(d) => d as usize,
            None => return invalid_request("'$.dimensions' is invalid.", Some("dimensions")),
        },
    };
    let o = &shared.opts;
    if inputs.len() > o.max_inputs {
        return invalid_request(
            &format!(
                "'$.input' is invalid: {} inputs given, the maximum is {}.",
                inputs.len(),
                o.max_inputs
            ),
            Some("input"),
        );
    }
    let counts: Vec<u64> = inputs
        .iter()
        .map(|i| match o.exact_usage {
            true => u64::from(billed_tokens(model, i)),
            false => u64::from(fake_token_count(i)),
        })
        .collect();
    if let Some(n) = counts.iter().find(|n| **n > o.max_input_tokens as u64) {
        return invalid_request(
            &format!(
                "This model's maximum context length is {} tokens, however you requested {n} tokens ({n} in your prompt; 0 for the completion). Please reduce your prompt; or completion length.",
                o.max_input_tokens
            ),
            None,
        );
    }
    let tokens: u64 = counts.iter().sum();
    if tokens > o.max_request_tokens as u64 {
        return invalid_request(
            &format!(
                "Requested {tokens} tokens, max {} tokens per request",
                o.max_request_tokens
            ),
            None,
        );
    }

    let values = inputs
        .iter()
        .map(|input| {
            let v = expected_embedding(input, dims);
            if base64 {
                // A plain loop: the benchmarks run this fake on one core beside the load
                // generator, and an iterator chain here was a sixth of that core.
                let mut bytes = Vec::with_capacity(v.len() * 4);
                for f in &v {
                    bytes.extend_from_slice(&f.to_le_bytes());
                }
                EmbeddingValue::Base64(base64_encode(&bytes))
            } else {
                EmbeddingValue::Float(v)
            }
        })
        .collect();
    let usage = EmbeddingUsage {
        prompt_tokens: tokens,
        total_tokens: tokens,
    };
    let body = embeddings_body(values, model, &usage);
    shared.embedding_calls.fetch_add(1, Ordering::SeqCst);
    shared
        .embedding_inputs
        .fetch_add(inputs.len(), Ordering::SeqCst);
    let mut resp = json_response(StatusCode::OK, body);
    if let Ok(v) = HeaderValue::from_str(model) {
        resp.headers_mut().insert("openai-model", v);
    }
    resp.headers_mut()
        .insert("openai-version", HeaderValue::from_static("2020-10-01"));
    resp
}

// --- chat ------------------------------------------------------------------------------------

fn chat(
    shared: &Arc<Shared>,
    body: &[u8],
    deployment: Option<&str>,
    request_id: &str,
) -> Response<InnerBody> {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return invalid_request("We could not parse the JSON body of your request.", None),
    };
    let model = match (req.get("model").and_then(Value::as_str), deployment) {
        (Some(m), _) => m.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            return invalid_request("you must provide a model parameter", Some("model"))
        }
    };
    let prompt_tokens = req
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(|c| c.split_whitespace().count() as u64)
                .sum::<u64>()
        })
        .unwrap_or(0)
        .max(1);
    let n = shared.opts.stream_chunks;
    let id = format!(
        "chatcmpl-fake-{}",
        request_id.trim_start_matches("req_fake_")
    );
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let content: String = (0..n).map(|i| format!("tok{i} ")).collect();
        let reply = json!({
            "id": id,
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n as u64
            },
            "system_fingerprint": null
        });
        return json_response(StatusCode::OK, serde_json::to_vec(&reply).expect("json"));
    }
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let sse = SseState {
        shared: shared.clone(),
        gate: shared.streams.subscribe(),
        started_generation: shared.streams.borrow().generation,
        id,
        model,
        next: 0,
        n,
        interval: shared.opts.stream_interval,
        include_usage,
        prompt_tokens,
        finished: false,
    };
    let stream = futures_util::stream::unfold(sse, |mut st| async move {
        let item = st.next_event().await?;
        Some((item, st))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

/// State of one streamed chat reply. Events: chunk 0..n (each `interval` apart; the last one
/// waits for the hold gate), an optional usage chunk, then `[DONE]`.
struct SseState {
    shared: Arc<Shared>,
    gate: watch::Receiver<StreamGate>,
    started_generation: u64,
    id: String,
    model: String,
    next: usize,
    n: usize,
    interval: Duration,
    include_usage: bool,
    prompt_tokens: u64,
    finished: bool,
}

impl SseState {
    async fn next_event(&mut self) -> Option<Result<Frame<Bytes>, FakeError>> {
        if self.finished {
            return None;
        }
        let k = self.next;
        self.next += 1;
        if k < self.n {
            if k > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = self.shared.shutdown() => return self.abort(),
                }
            }
            if k == self.n - 1 {
                let since = self.started_generation;
                let released = tokio::select! {
                    r = self.gate.wait_for(|g| !g.hold || g.generation > since) => r.is_ok(),
                    _ = self.shared.shutdown() => false,
                };
                if !released {
                    return self.abort();
                }
            }
            let last = k == self.n - 1;
            let chunk = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": 1,
                "model": self.model,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "delta": if k == 0 {
                        json!({"role": "assistant", "content": format!("tok{k} ")})
                    } else {
                        json!({"content": format!("tok{k} ")})
                    },
                    "logprobs": null,
                    "finish_reason": if last { json!("stop") } else { Value::Null }
                }]
            });
            return Some(Ok(sse_data(&chunk.to_string())));
        }
        if k == self.n && self.include_usage {
            let chunk = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": 1,
                "model": self.model,
                "system_fingerprint": null,
                "choices": [],
                "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.n,
                    "total_tokens": self.prompt_tokens + self.n as u64
                }
            });
            return Some(Ok(sse_data(&chunk.to_string())));
        }
        self.finished = true;
        Some(Ok(sse_data("[DONE]")))
    }

    fn abort(&mut self) -> Option<Result<Frame<Bytes>, FakeError>> {
        self.finished = true;
        Some(Err(FakeError::new("shutting down")))
    }
}

fn sse_data(payload: &str) -> Frame<Bytes> {
    let mut b = BytesMut::with_capacity(payload.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(payload.as_bytes());
    b.extend_from_slice(b"\n\n");
    Frame::data(b.freeze())
}
