//! What a fake is told at start-up ([`FakeOptions`]), and the capacity and random faults of the
//! model server it plays.

use std::time::Duration;

use bytes::Bytes;

use crate::behavior::Action;
use crate::replies::forced_error_body;

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
    /// Keep a [`Recorded`](crate::Recorded) copy of every request. Turn off for long benchmarks:
    /// the log grows without bound (the binary turns it off, since nobody could read it there).
    pub record_requests: bool,
    /// Reject embeddings requests with more inputs than this (OpenAI's limit is 2048), so tests
    /// catch a proxy that merges too many inputs into one call.
    pub max_inputs: usize,
    /// Reject any single embeddings input above this many tokens, counted by
    /// [`fake_token_count`](crate::fake_token_count) (OpenAI's per-input limit is 8192). Lets
    /// tests exercise "one bad input in a merged batch".
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
    /// Bill OpenAI's models with their real tokenizer ([`billed_tokens`](crate::billed_tokens));
    /// off, every model is billed with [`fake_token_count`](crate::fake_token_count). The CPU
    /// benchmarks turn it off: the fake shares a core with their load generator, and a proxy
    /// that counts tokens itself ignores the bill.
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
    /// `429=0.2,503=0.1,drop=0.05,truncate=0.05,hang=0.2` (the binary's `--faults`).
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

    pub(crate) fn is_empty(&self) -> bool {
        *self == FaultMix::default()
    }

    /// The action for one call, from a uniform draw in [0, 1).
    pub(crate) fn pick(&self, draw: f64) -> Option<Action> {
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
