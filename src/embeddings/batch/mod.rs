//! Lanes and their dispatchers: how many callers' inputs become few upstream calls.
//!
//! A lane holds the inputs waiting under one batch key (and one input kind: text and token
//! arrays cannot share an `input` array). Identical inputs in a lane are one *flight*: the
//! second caller adds itself to the first one's waiters instead of queueing a twin
//! (singleflight). A dispatcher task per busy lane takes an upstream slot as soon as one is
//! free, then everything queued by that moment (up to the per-call input and token caps) goes
//! out in one call. While slots are busy, inputs pile up and leave together in the next call;
//! when traffic is idle, an input leaves at once. A flight whose callers have all gone (they
//! disconnected or ran out of time) is dropped before it is sent.
//!
//! If a merged call is refused as a bad request, the batch is split in halves and each half
//! resent, down to single inputs, so that only the offending input's callers get the error.

mod call;
mod dispatcher;
mod lanes;
mod reply;

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    ops::Range,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::{sync::oneshot, time::Instant};

use super::{
    cache::{Embedded, VectorCache},
    keys::BatchKey,
    render,
    request::Input,
    tokens::{apportion, Tokenizer},
};
use crate::{
    config::UpstreamEncoding,
    http::{
        body::{self, IdleTimeout, Limited, ProxyBody},
        errors::ProxyError,
        route::Route,
    },
    metrics::{Metrics, TokenSource},
    passthrough::{error_chain, strip_hop_by_hop},
    resilience::{
        adaptive_limit::Signal,
        limits::{Capacity, Places},
        rate_gate::RateGates,
        retry::{mark_final, RetryReason, Tried, Verdict},
    },
    upstream::{
        credential::CredentialId,
        outbound::{self, Attempt, Call, HeadArrived, Kind, LiveDeadline, Outbound, Reply},
        Upstream,
    },
};

pub use self::lanes::Batcher;
use self::{call::*, dispatcher::*, lanes::*};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Retry-After for a caller shed because the queue is full.
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Largest upstream reply read: 2048 float JSON vectors of 3072 dimensions, with room to spare.
const MAX_REPLY_BYTES: u64 = 512 * 1024 * 1024;

/// Whether an upstream refusal may be about one input rather than the whole request: a status
/// that blames the content (400, 413, 422), and no request-level field named as the culprit.
/// (401, 403, 404, 429 and 5xx blame the credential, the model or the moment; a `param` such as
/// `dimensions` or `encoding_format` blames the request: every part would fail alike, so those
/// go to every caller as they are.)
fn blames_input(failure: &Failure) -> bool {
    if !matches!(failure.status.as_u16(), 400 | 413 | 422) {
        return false;
    }
    let param = serde_json::from_slice::<serde_json::Value>(&failure.body)
        .ok()
        .and_then(|v| v["error"]["param"].as_str().map(str::to_string));
    match param {
        None => true,
        Some(p) => p == "input" || p.starts_with("input") || p.starts_with("$.input"),
    }
}

/// Extra upstream calls allowed to isolate refused inputs in a batch of `n`: enough to bisect
/// down to a couple of offenders (about 2·log2 n each), few enough that a refusal that was about
/// the whole request after all costs a handful of calls, not 2n.
fn isolation_budget(n: usize) -> usize {
    let depth = usize::BITS - n.max(1).leading_zeros();
    4 * depth as usize + 2
}

/// What a waiting caller receives for one input.
pub type Outcome = Result<Arc<Embedded>, Arc<Failure>>;

/// An error reply shared by every caller of the failed inputs: the upstream's own (status,
/// headers, body, rate-limit headers included) or one embedcar made.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Upstream attempts the call made, for the failure log; `None` before the retry loop.
    pub attempts: Option<u32>,
}

impl Failure {
    pub fn from_error(e: ProxyError) -> Failure {
        let (status, headers, body) = e.into_parts();
        Failure {
            status,
            headers,
            body,
            attempts: None,
        }
    }

    pub fn to_response(&self) -> Response<ProxyBody> {
        let mut r = Response::new(body::full(self.body.clone()));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers.clone();
        if let Some(n) = self.attempts {
            r.extensions_mut().insert(crate::http::errors::Attempts(n));
        }
        r
    }
}

/// Text inputs and token-array inputs go in separate calls: the API takes an array of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    Text,
    Tokens,
}

impl InputKind {
    pub fn of(input: &Input) -> InputKind {
        match input {
            Input::Text(_) => InputKind::Text,
            Input::Tokens(_) => InputKind::Tokens,
        }
    }
}

/// What every call of a lane carries: where it goes and as whom.
pub struct Template {
    /// Path and query on the upstream, as the callers sent them.
    pub target: String,
    /// The end-to-end headers every caller of the lane shares (the batch key covers them), without
    /// the ignored ones (per request: ids, trace context, user agent, idempotency keys), which
    /// belong to one caller and ride only on a call that carries that caller alone.
    pub headers: HeaderMap,
    pub model: Option<String>,
    pub dimensions: Option<u32>,
    pub user: Option<String>,
    pub tokenizer: Tokenizer,
    pub cache_scope: u128,
    /// Whose rate gate the calls pass.
    pub credential: CredentialId,
}

/// An input the caller could not find in the cache.
pub struct Miss {
    pub hash: u128,
    pub input: Input,
    /// Exact tokens, or an estimate when the tokenizer is unknown; sizes calls.
    pub size: u64,
}

/// The caller's claim on one input's outcome.
pub struct Ticket {
    pub rx: oneshot::Receiver<Outcome>,
    /// Whether this input joined a flight already under way (a coalesced twin).
    pub joined: bool,
}

/// One caller of the engine, as its upstream calls need to know it.
pub struct Caller {
    /// Its end-to-end headers that vary per request (`embeddings.ignore_headers`): sent on a
    /// call that carries this caller alone, never on a merged one.
    pub own_headers: HeaderMap,
}

impl Caller {
    fn request_id(&self) -> &str {
        self.own_headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    }
}

/// Settings the dispatchers and calls need.
pub struct BatchSettings {
    /// Inputs queued across all lanes at most; beyond, callers are shed with 503.
    pub max_queued: usize,
    pub should_retry_header: bool,
    pub max_inputs: usize,
    pub max_tokens: u64,
    pub linger: Duration,
    pub upstream_encoding: UpstreamEncoding,
    pub body_idle_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16, body: &str) -> Failure {
        Failure {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
            attempts: None,
        }
    }

    #[test]
    fn only_refusals_that_may_be_about_an_input_are_split() {
        let input_error = r#"{"error":{"message":"bad","type":"invalid_request_error","param":"input","code":null}}"#;
        let no_param = r#"{"error":{"message":"too long","param":null}}"#;
        let request_error = r#"{"error":{"message":"bad","param":"dimensions"}}"#;
        assert!(blames_input(&failure(400, input_error)));
        assert!(blames_input(&failure(400, no_param)));
        assert!(blames_input(&failure(422, "not json")));
        assert!(!blames_input(&failure(400, request_error)));
        assert!(!blames_input(&failure(401, input_error)));
        assert!(!blames_input(&failure(429, no_param)));
        assert!(!blames_input(&failure(500, no_param)));
    }

    #[test]
    fn the_isolation_budget_grows_with_the_log_of_the_batch() {
        assert_eq!(isolation_budget(1), 6);
        assert_eq!(isolation_budget(2), 10);
        assert_eq!(isolation_budget(2048), 50);
        // One offender in 2048 needs 2 calls per level over 11 levels.
        assert!(isolation_budget(2048) >= 2 * 11);
    }
}
