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

mod behavior;
mod embedding;
mod handler;
mod options;
mod replies;
mod server;

pub use behavior::{Behavior, Rule};
pub use embedding::{
    base64_decode, base64_encode, billed_tokens, decode_embedding, expected_embedding,
    fake_token_count, parse_embedding_input, EmbeddingInput,
};
pub use options::{FakeOptions, FaultMix, OverCapacity};
pub use server::{FakeUpstream, Recorded};

/// Paths under this prefix are the fake's own control plane, not part of the OpenAI surface:
/// `GET /__fake/stats` returns the counters as JSON and `POST /__fake/reset` calls
/// [`FakeUpstream::reset_stats`]. They exist so that a benchmark or a Python test talking to the
/// binary can read "how many upstream embeddings calls did the proxy make" without
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
