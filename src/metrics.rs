//! Every metric, in one struct per component (requests, upstream, embeddings engine, cache,
//! resilience, shared tier), each registering its own families in one registry (not the global
//! default one, so that tests can run many proxies in one process).
//!
//! Labels are bounded: routes come from a fixed list of API endpoints, statuses are numbers, and
//! nothing derived from a credential or a free-form path ever becomes a label.

use std::{sync::OnceLock, time::Duration};

use http::{Method, StatusCode};
use prometheus::{
    core::Collector, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

use crate::http::route::Route;

/// Request latency buckets, in seconds: from a cache hit (sub-millisecond) to a long completion.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Waits for a concurrency slot: zero in the common case, up to the configured wait budget.
const WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric embedcar exports, one struct per component, each registered in `registry` by
/// its own `register`; the helpers below (`record_request`, `observe_upstream`, ...) keep the
/// per-request paths cheap.
pub struct Metrics {
    registry: Registry,
    /// Inbound requests and connections, and what embedcar refused or failed itself.
    pub requests: RequestMetrics,
    /// Exchanges with the upstream.
    pub upstream: UpstreamMetrics,
    /// The embeddings engine: inputs, coalescing, batches and tokens.
    pub embeddings: EngineMetrics,
    /// The vector cache's size.
    pub cache: CacheMetrics,
    /// Retries, rate gates, the circuit breaker and the concurrency limits.
    pub resilience: ResilienceMetrics,
    /// The shared tier's (Redis) commands, fallback, L2 cache and replicas.
    pub redis: RedisMetrics,
}

/// Inbound requests and connections, and the errors embedcar answered itself.
pub struct RequestMetrics {
    /// Requests answered, by route, method and status.
    pub answered: IntCounterVec,
    /// Time from request head to the end of the response body, by route and method.
    pub duration: HistogramVec,
    /// Requests being handled now.
    pub in_flight: IntGauge,
    /// Requests embedcar refused to protect itself or the upstream, by reason (error code).
    pub shed: IntCounterVec,
    /// Other errors embedcar answered itself (the caller's, the upstream's, a deadline's), by
    /// reason (error code). See [`Metrics::count_own_error`].
    pub errors: IntCounterVec,
    /// Deadlines that expired, by kind (`first_byte`, `body_idle`, `embeddings`).
    pub deadline_expired: IntCounterVec,
    /// Client connections open now, and accepted in total.
    pub open_connections: IntGauge,
    pub connections: IntCounter,
    /// Idle keep-alive connections closed at `server.max_connections` to admit new clients.
    pub connections_reclaimed: IntCounter,
    /// Request body bytes held in memory now, against `server.max_buffered_request_bytes`.
    pub buffer_bytes: IntGauge,
    /// Children of the per-request metrics above, looked up once and kept (see [`Children`]).
    answered_by: Children<IntCounter>,
    duration_by: Children<Histogram>,
}

/// Exchanges with the upstream.
pub struct UpstreamMetrics {
    /// Upstream exchanges by route and outcome (a status code, or `connect_error`, `timeout`,
    /// `io_error`, `abandoned`).
    pub requests: IntCounterVec,
    /// Time to the upstream's response headers, by route.
    pub duration: HistogramVec,
    /// Upstream exchanges holding a concurrency slot now.
    pub in_flight: IntGauge,
    /// Replies that said a credential's budget is spent (`x-ratelimit-remaining-*` 0), by kind.
    pub ratelimit_exhausted: IntCounterVec,
    /// Children of the per-exchange metrics above, looked up once and kept (see [`Children`]).
    requests_by: Children<IntCounter>,
    duration_by: Children<Histogram>,
}

/// The embeddings engine.
pub struct EngineMetrics {
    /// Embeddings inputs received, answered from the cache, joined to an identical input in
    /// flight, dropped unsent because nobody waited any more.
    pub inputs: IntCounter,
    pub cache_hits: IntCounter,
    pub coalesced: IntCounter,
    pub abandoned: IntCounter,
    /// Inputs waiting for an upstream call now.
    pub queue_depth: IntGauge,
    /// Inputs per upstream embeddings call.
    pub batch_inputs: Histogram,
    /// Merged calls split to isolate an input the upstream refused.
    pub isolation_splits: IntCounter,
    /// Tokens of the inputs answered, by source (`upstream`: billed; `cache`: saved).
    pub tokens: IntCounterVec,
    /// Children of `tokens`, looked up once and kept (see [`Children`]).
    tokens_by: Children<IntCounter>,
}

/// The vector cache's entries and bytes (as charged against `cache.max_bytes`), read from the
/// cache when scraped (see [`Metrics::observe_cache`]) rather than kept up to date on every
/// insert and eviction.
pub struct CacheMetrics {
    pub entries: IntGauge,
    pub bytes: IntGauge,
}

/// Retries, rate gates, the circuit breaker, the concurrency slots and the adaptive limit.
pub struct ResilienceMetrics {
    /// Upstream attempts repeated, by reason; retries refused by the budget.
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounter,
    /// Time spent waiting at a rate gate; gates shut by the upstream's feedback; requests refused
    /// because the gate would not open before their deadline.
    pub gate_wait: Histogram,
    pub gate_closures: IntCounter,
    pub gate_rejections: IntCounter,
    /// Circuit breaker: 1 while it refuses anyone's calls (the upstream cannot be reached, or a
    /// credential's calls nearly all fail), else 0; transitions by the state entered.
    pub breaker_state: IntGauge,
    pub breaker_transitions: IntCounterVec,
    /// Credentials whose circuit is open now.
    pub breaker_open_credentials: IntGauge,
    /// Time spent waiting for a concurrency slot.
    pub concurrency_wait: Histogram,
    /// The adaptive limit on embeddings calls in flight upstream.
    pub adaptive_limit: IntGauge,
    /// The size-adjusted latency baseline the last judged call was compared with.
    pub adaptive_baseline: prometheus::Gauge,
    pub adaptive_decisions: IntCounterVec,
}

/// The shared tier's own metrics (see `crate::shared_tier`).
pub struct RedisMetrics {
    /// Latency of Redis commands that answered, by operation.
    pub command_seconds: HistogramVec,
    /// Commands that failed, by operation and kind (`error`, `timeout`).
    pub errors: IntCounterVec,
    /// Commands not sent because the tier's breaker is open.
    pub skipped: IntCounter,
    /// 1 while the tier does without Redis (local gates, L1 only), else 0.
    pub fallback: IntGauge,
    /// L1 misses answered by the shared cache, and not.
    pub l2_hits: IntCounter,
    pub l2_misses: IntCounter,
    /// Replicas heard from within `REPLICA_TTL`, this one included, as last counted.
    pub replicas: IntGauge,
}

/// The children of a labelled metric, looked up on first use and kept, by a dense number for
/// their label values. prometheus' `with_label_values` hashes the values and takes a lock on
/// every call, which on the pass-through's path costs more than the count itself; a child is
/// only created when first used, so /metrics still shows only series that happened.
struct Children<T> {
    slots: Box<[OnceLock<T>]>,
}

impl<T> Children<T> {
    fn new(len: usize) -> Self {
        Self {
            slots: (0..len).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, index: usize, make: impl FnOnce() -> T) -> &T {
        self.slots[index].get_or_init(make)
    }
}

/// Status labels: the codes the OpenAI API and embedcar answer with, then the rest by class,
/// and 499 for a caller that left before its answer (nginx's code).
const STATUS_LABELS: [&str; 22] = [
    "200", "201", "204", "400", "401", "403", "404", "408", "409", "413", "422", "429", "499",
    "500", "502", "503", "504", "1xx", "2xx", "3xx", "4xx", "5xx",
];

fn status_index(code: u16) -> usize {
    match code {
        200 => 0,
        201 => 1,
        204 => 2,
        400 => 3,
        401 => 4,
        403 => 5,
        404 => 6,
        408 => 7,
        409 => 8,
        413 => 9,
        422 => 10,
        429 => 11,
        499 => 12,
        500 => 13,
        502 => 14,
        503 => 15,
        504 => 16,
        c if c < 200 => 17,
        c if c < 300 => 18,
        c if c < 400 => 19,
        c if c < 500 => 20,
        _ => 21,
    }
}

/// Method labels; anything unusual is `other`.
const METHOD_LABELS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other",
];

/// A request method as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodLabel(u8);

impl MethodLabel {
    pub fn of(m: &Method) -> MethodLabel {
        MethodLabel(match *m {
            Method::GET => 0,
            Method::POST => 1,
            Method::PUT => 2,
            Method::DELETE => 3,
            Method::PATCH => 4,
            Method::HEAD => 5,
            Method::OPTIONS => 6,
            _ => 7,
        })
    }

    pub fn as_str(self) -> &'static str {
        METHOD_LABELS[self.0 as usize]
    }
}

/// The kinds of `embedcar_deadline_expired_total`.
pub const DEADLINE_KINDS: [&str; 3] = ["first_byte", "body_idle", "embeddings"];

/// Inputs per upstream call: from a lone input to the API's 2048 cap.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Buckets of a Redis command's latency, in seconds: a same-zone round trip is well under a
/// millisecond; the top is the command timeout's range.
const COMMAND_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// A component's metric families, as registered (and counted by the registry test).
type Collectors = Vec<Box<dyn Collector>>;

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric")
}

fn histogram_vec(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric")
}

/// Registers a component's families in the one registry; a name used twice is a bug.
fn register_all(registry: &Registry, collectors: Collectors) {
    for c in collectors {
        registry.register(c).expect("metric names are unique");
    }
}

impl RequestMetrics {
    fn register(registry: &Registry) -> Self {
        let m = RequestMetrics {
            answered: counter_vec(
                "embedcar_requests_total",
                "Requests answered, by route, method and status.",
                &["route", "method", "status"],
            ),
            duration: histogram_vec(
                "embedcar_request_duration_seconds",
                "Time from request head to the end of the response body.",
                LATENCY_BUCKETS,
                &["route", "method"],
            ),
            in_flight: gauge("embedcar_requests_in_flight", "Requests being handled now."),
            shed: counter_vec(
                "embedcar_shed_requests_total",
                "Requests embedcar refused to protect itself or the upstream (overloaded, queue or buffers full, rate gate, open circuit, shutting down), by reason.",
                &["reason"],
            ),
            errors: counter_vec(
                "embedcar_errors_total",
                "Errors embedcar answered itself other than shedding, by reason: the caller's (invalid_request, request_too_large, request_body_timeout), the upstream's or a deadline's (upstream_unreachable, upstream_timeout, upstream_invalid_reply, deadline_exceeded), its own (internal_error).",
                &["reason"],
            ),
            deadline_expired: counter_vec(
                "embedcar_deadline_expired_total",
                "Deadlines that expired, by kind (first_byte, body_idle, embeddings).",
                &["kind"],
            ),
            open_connections: gauge("embedcar_open_connections", "Client connections open now."),
            connections: counter("embedcar_connections_total", "Client connections accepted."),
            connections_reclaimed: counter(
                "embedcar_connections_reclaimed_total",
                "Idle keep-alive client connections closed at server.max_connections to admit new ones.",
            ),
            buffer_bytes: gauge(
                "embedcar_request_buffer_bytes",
                "Request body bytes held in memory now (bodies read whole), against server.max_buffered_request_bytes.",
            ),
            answered_by: Children::new(Route::COUNT * METHOD_LABELS.len() * STATUS_LABELS.len()),
            duration_by: Children::new(Route::COUNT * METHOD_LABELS.len()),
        };
        // Every known label value from the start, so an alert's rate() sees 0, not "no data".
        for (code, blame) in crate::http::errors::CODES {
            match blame {
                crate::http::errors::Blame::Shed => m.shed.with_label_values(&[code]),
                _ => m.errors.with_label_values(&[code]),
            };
        }
        for kind in DEADLINE_KINDS {
            m.deadline_expired.with_label_values(&[kind]);
        }
        register_all(registry, m.collectors());
        m
    }

    fn collectors(&self) -> Collectors {
        vec![
            Box::new(self.answered.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.shed.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.deadline_expired.clone()),
            Box::new(self.open_connections.clone()),
            Box::new(self.connections.clone()),
            Box::new(self.buffer_bytes.clone()),
            Box::new(self.connections_reclaimed.clone()),
        ]
    }
}

impl UpstreamMetrics {
    fn register(registry: &Registry) -> Self {
        let m = UpstreamMetrics {
            requests: counter_vec(
                "embedcar_upstream_requests_total",
                "Upstream exchanges by route and outcome (status code, connect_error, timeout, io_error, abandoned).",
                &["route", "status"],
            ),
            duration: histogram_vec(
                "embedcar_upstream_duration_seconds",
                "Time to the upstream's response headers.",
                LATENCY_BUCKETS,
                &["route"],
            ),
            in_flight: gauge(
                "embedcar_upstream_in_flight",
                "Upstream exchanges holding a concurrency slot now.",
            ),
            ratelimit_exhausted: counter_vec(
                "embedcar_upstream_ratelimit_exhausted_total",
                "Upstream replies whose x-ratelimit-remaining-{requests,tokens} was 0, by kind.",
                &["kind"],
            ),
            requests_by: Children::new(Route::COUNT * STATUS_LABELS.len()),
            duration_by: Children::new(Route::COUNT),
        };
        for kind in ["requests", "tokens"] {
            m.ratelimit_exhausted.with_label_values(&[kind]);
        }
        register_all(registry, m.collectors());
        m
    }

    fn collectors(&self) -> Collectors {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.ratelimit_exhausted.clone()),
        ]
    }
}

impl EngineMetrics {
    fn register(registry: &Registry) -> Self {
        let m = EngineMetrics {
            inputs: counter(
                "embedcar_embeddings_inputs_total",
                "Embeddings inputs received.",
            ),
            cache_hits: counter(
                "embedcar_embeddings_cache_hits_total",
                "Embeddings inputs answered from the cache.",
            ),
            coalesced: counter(
                "embedcar_embeddings_coalesced_total",
                "Embeddings inputs joined to an identical input already queued or in flight.",
            ),
            abandoned: counter(
                "embedcar_embeddings_abandoned_inputs_total",
                "Embeddings inputs dropped unsent because every caller waiting for them left.",
            ),
            queue_depth: gauge(
                "embedcar_embeddings_queue_depth",
                "Embeddings inputs waiting for an upstream call.",
            ),
            batch_inputs: histogram(
                "embedcar_embeddings_batch_inputs",
                "Inputs per upstream embeddings call.",
                BATCH_BUCKETS,
            ),
            isolation_splits: counter(
                "embedcar_embeddings_isolation_splits_total",
                "Merged embeddings calls split to isolate an input the upstream refused.",
            ),
            tokens: counter_vec(
                "embedcar_embeddings_tokens_total",
                "Tokens of the embeddings inputs answered, by source (upstream, cache).",
                &["source"],
            ),
            tokens_by: Children::new(TokenSource::COUNT),
        };
        for source in [TokenSource::Upstream, TokenSource::Cache] {
            m.tokens.with_label_values(&[source.as_str()]);
        }
        register_all(registry, m.collectors());
        m
    }

    fn collectors(&self) -> Collectors {
        vec![
            Box::new(self.inputs.clone()),
            Box::new(self.cache_hits.clone()),
            Box::new(self.coalesced.clone()),
            Box::new(self.abandoned.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.batch_inputs.clone()),
            Box::new(self.isolation_splits.clone()),
            Box::new(self.tokens.clone()),
        ]
    }
}

impl CacheMetrics {
    fn register(registry: &Registry) -> Self {
        let m = CacheMetrics {
            entries: gauge(
                "embedcar_cache_entries",
                "Vectors held in the embeddings cache.",
            ),
            bytes: gauge(
                "embedcar_cache_bytes",
                "Bytes held in the embeddings cache, as charged against cache.max_bytes.",
            ),
        };
        register_all(registry, m.collectors());
        m
    }

    fn collectors(&self) -> Collectors {
        vec![Box::new(self.entries.clone()), Box::new(self.bytes.clone())]
    }
}

impl ResilienceMetrics {
    fn register(registry: &Registry) -> Self {
        let m = ResilienceMetrics {
            retries: counter_vec(
                "embedcar_retries_total",
                "Upstream attempts repeated, by reason (status code, connect_error, timeout, io_error).",
                &["reason"],
            ),
            retry_budget_exhausted: counter(
                "embedcar_retry_budget_exhausted_total",
                "Retries not made because the retry budget was spent.",
            ),
            gate_wait: histogram(
                "embedcar_rate_gate_wait_seconds",
                "Time spent waiting at a rate gate.",
                WAIT_BUCKETS,
            ),
            gate_closures: counter(
                "embedcar_rate_gate_closures_total",
                "Rate gates shut by the upstream's 429 or rate-limit headers.",
            ),
            gate_rejections: counter(
                "embedcar_rate_gate_rejections_total",
                "Requests refused with 429 because the gate would not open before their deadline.",
            ),
            breaker_state: gauge(
                "embedcar_circuit_breaker_state",
                "Upstream circuit breaker: 1 while it refuses anyone's calls (the upstream cannot be reached, or a credential's calls nearly all fail), else 0.",
            ),
            breaker_transitions: counter_vec(
                "embedcar_circuit_breaker_transitions_total",
                "Circuit breaker transitions, by the state entered.",
                &["state"],
            ),
            breaker_open_credentials: gauge(
                "embedcar_circuit_breaker_open_credentials",
                "Credentials whose upstream calls the circuit breaker refuses now.",
            ),
            concurrency_wait: histogram(
                "embedcar_concurrency_wait_seconds",
                "Time spent waiting for an upstream concurrency slot.",
                WAIT_BUCKETS,
            ),
            adaptive_limit: gauge(
                "embedcar_upstream_concurrency_limit",
                "The adaptive limit on embeddings calls in flight upstream (limits.max_concurrency is its ceiling).",
            ),
            adaptive_baseline: prometheus::Gauge::new(
                "embedcar_upstream_latency_baseline_seconds",
                "What an unqueued call of the last judged call's size takes, as the adaptive limit estimates it.",
            )
            .expect("valid metric"),
            adaptive_decisions: counter_vec(
                "embedcar_upstream_concurrency_decisions_total",
                "Changes of the adaptive concurrency limit, by decision.",
                &["decision"],
            ),
        };
        m.precreate_labels();
        register_all(registry, m.collectors());
        m
    }

    /// Every retry reason, breaker state and limit decision at 0 from the start, so an alert's
    /// rate() sees 0, not "no data".
    fn precreate_labels(&self) {
        for reason in crate::resilience::retry::RetryReason::LABELS {
            self.retries.with_label_values(&[reason]);
        }
        for state in crate::resilience::breaker::STATE_LABELS {
            self.breaker_transitions.with_label_values(&[state]);
        }
        for d in crate::resilience::adaptive_limit::Decision::ALL {
            self.adaptive_decisions.with_label_values(&[d.label()]);
        }
    }

    fn collectors(&self) -> Collectors {
        vec![
            Box::new(self.retries.clone()),
            Box::new(self.retry_budget_exhausted.clone()),
            Box::new(self.gate_wait.clone()),
            Box::new(self.gate_closures.clone()),
            Box::new(self.gate_rejections.clone()),
            Box::new(self.breaker_state.clone()),
            Box::new(self.breaker_transitions.clone()),
            Box::new(self.breaker_open_credentials.clone()),
            Box::new(self.concurrency_wait.clone()),
            Box::new(self.adaptive_limit.clone()),
            Box::new(self.adaptive_baseline.clone()),
            Box::new(self.adaptive_decisions.clone()),
        ]
    }
}

impl RedisMetrics {
    fn register(registry: &Registry) -> Self {
        let m = RedisMetrics {
            command_seconds: histogram_vec(
                "embedcar_redis_command_seconds",
                "Latency of Redis commands that answered, by operation.",
                COMMAND_BUCKETS,
                &["op"],
            ),
            errors: counter_vec(
                "embedcar_redis_errors_total",
                "Redis commands that failed, by operation and kind (error, timeout).",
                &["op", "kind"],
            ),
            skipped: counter(
                "embedcar_redis_skipped_total",
                "Redis commands not sent because the shared tier's breaker is open.",
            ),
            fallback: gauge(
                "embedcar_redis_fallback",
                "1 while the shared tier does without Redis (local gates with a divided budget, in-process cache only), else 0.",
            ),
            l2_hits: counter(
                "embedcar_redis_cache_hits_total",
                "In-process cache misses answered by the shared (Redis) cache.",
            ),
            l2_misses: counter(
                "embedcar_redis_cache_misses_total",
                "In-process cache misses the shared (Redis) cache did not have (or could not be asked for).",
            ),
            replicas: gauge(
                "embedcar_redis_replicas",
                "Replicas of embedcar heard from through Redis recently, this one included (0: never counted).",
            ),
        };
        for op in crate::shared_tier::Op::ALL {
            for kind in ["error", "timeout"] {
                m.errors.with_label_values(&[op.label(), kind]);
            }
        }
        register_all(registry, m.collectors());
        m
    }

    fn collectors(&self) -> Collectors {
        vec![
            Box::new(self.command_seconds.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.skipped.clone()),
            Box::new(self.fallback.clone()),
            Box::new(self.l2_hits.clone()),
            Box::new(self.l2_misses.clone()),
            Box::new(self.replicas.clone()),
        ]
    }
}

impl Metrics {
    /// A fresh registry with every component's families, and the process_* ones, in it.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            requests: RequestMetrics::register(&registry),
            upstream: UpstreamMetrics::register(&registry),
            embeddings: EngineMetrics::register(&registry),
            cache: CacheMetrics::register(&registry),
            resilience: ResilienceMetrics::register(&registry),
            redis: RedisMetrics::register(&registry),
            registry,
        };
        // The standard process_* metrics (resident and virtual memory, CPU seconds, open and max
        // fds, start time), read from /proc/self at each scrape. Unprefixed, by the Prometheus
        // client convention, so dashboards and alerts written for any process work unchanged.
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metric names are unique");
        m
    }

    /// An error reply embedcar made itself, by its code: shed, or an error by reason. A code
    /// embedcar does not know (a chained embedcar upstream's newer one) counts as `other`.
    pub fn count_own_error(&self, code: &str) {
        match crate::http::errors::known_code(code) {
            Some((code, crate::http::errors::Blame::Shed)) => {
                self.requests.shed.with_label_values(&[code])
            }
            Some((code, _)) => self.requests.errors.with_label_values(&[code]),
            None => self.requests.errors.with_label_values(&["other"]),
        }
        .inc();
    }

    /// Every metric family registered, gathered as a scrape would.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Sets the cache gauges from the cache's own counts (`VectorCache::usage`), just before
    /// a scrape: the cache already keeps them, so the request path pays nothing for the metric.
    pub fn observe_cache(&self, entries: u64, bytes: u64) {
        self.cache
            .entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.cache
            .bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// One request answered (`status` 499: the caller left first), timed from its head to the
    /// end of its response body.
    pub fn record_request(
        &self,
        route: Route,
        method: MethodLabel,
        status: u16,
        elapsed: Duration,
    ) {
        let (r, m, st) = (route as usize, method.0 as usize, status_index(status));
        self.requests
            .answered_by
            .get(
                (r * METHOD_LABELS.len() + m) * STATUS_LABELS.len() + st,
                || {
                    self.requests.answered.with_label_values(&[
                        route.as_str(),
                        method.as_str(),
                        STATUS_LABELS[st],
                    ])
                },
            )
            .inc();
        self.requests
            .duration_by
            .get(r * METHOD_LABELS.len() + m, || {
                self.requests
                    .duration
                    .with_label_values(&[route.as_str(), method.as_str()])
            })
            .observe(elapsed.as_secs_f64());
    }

    /// An upstream exchange that got a response head.
    pub fn observe_upstream_status(&self, route: Route, status: StatusCode, elapsed: Duration) {
        let (r, st) = (route as usize, status_index(status.as_u16()));
        self.upstream
            .requests_by
            .get(r * STATUS_LABELS.len() + st, || {
                self.upstream
                    .requests
                    .with_label_values(&[route.as_str(), STATUS_LABELS[st]])
            })
            .inc();
        self.observe_upstream_duration(route, elapsed);
    }

    /// An upstream exchange that failed without a response (`outcome`: `timeout`,
    /// `connect_error`, ...): rare, so looked up each time.
    pub fn observe_upstream(&self, route: Route, outcome: &str, elapsed: Duration) {
        self.upstream
            .requests
            .with_label_values(&[route.as_str(), outcome])
            .inc();
        self.observe_upstream_duration(route, elapsed);
    }

    /// A route's upstream latency histogram, or `None` before its first upstream exchange: the
    /// status page reads it without creating the series (which would put an empty one in
    /// /metrics for a route that never had traffic).
    pub fn upstream_duration_of(&self, route: Route) -> Option<&Histogram> {
        self.upstream.duration_by.slots[route as usize].get()
    }

    fn observe_upstream_duration(&self, route: Route, elapsed: Duration) {
        self.upstream
            .duration_by
            .get(route as usize, || {
                self.upstream.duration.with_label_values(&[route.as_str()])
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Tokens of embeddings inputs answered, by where the answer came from.
    pub fn count_tokens(&self, source: TokenSource, tokens: u64) {
        self.embeddings
            .tokens_by
            .get(source as usize, || {
                self.embeddings.tokens.with_label_values(&[source.as_str()])
            })
            .inc_by(tokens);
    }
}

/// Where an embeddings input's answer came from, as the `source` label of the token counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Upstream,
    Cache,
}

impl TokenSource {
    /// How many sources there are (the variants above).
    const COUNT: usize = 2;

    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Upstream => "upstream",
            TokenSource::Cache => "cache",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric registered is exposed, named with the `embedcar_` prefix (or a standard
    /// process_* one), and documented in the README's metrics table, which lists no metric that
    /// does not exist. Read from the registry itself, so a metric added later is checked too.
    #[test]
    fn every_registered_metric_is_exposed_prefixed_and_documented() {
        let m = Metrics::new();
        // The per-request families get their series on first use; every other labelled
        // family starts with its known label values at 0.
        m.record_request(
            Route::Other,
            MethodLabel::of(&Method::GET),
            200,
            Duration::from_millis(100),
        );
        m.observe_upstream_status(Route::Other, StatusCode::OK, Duration::from_millis(3));
        m.redis
            .command_seconds
            .with_label_values(&["gate"])
            .observe(0.001);
        let text = String::from_utf8(m.render()).unwrap();
        let own: std::collections::BTreeSet<String> = m
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .filter(|name| !name.starts_with("process_"))
            .collect();
        assert_eq!(
            own.len(),
            [
                m.requests.collectors(),
                m.upstream.collectors(),
                m.embeddings.collectors(),
                m.cache.collectors(),
                m.resilience.collectors(),
                m.redis.collectors(),
            ]
            .iter()
            .map(Vec::len)
            .sum::<usize>(),
            "every collector registered shows: {own:?}"
        );
        for name in &own {
            assert!(name.starts_with("embedcar_"), "unprefixed {name}");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from /metrics"
            );
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let family = line["# TYPE ".len()..].split(' ').next().unwrap();
            assert!(
                family.starts_with("embedcar_") || family.starts_with("process_"),
                "unexpected metric family {family}"
            );
        }
        let documented: std::collections::BTreeSet<String> = include_str!("../README.md")
            .lines()
            .filter_map(|l| l.strip_prefix("| `embedcar_"))
            .filter_map(|rest| rest.split('`').next())
            .map(|name| format!("embedcar_{name}"))
            .collect();
        assert_eq!(
            own, documented,
            "the README's metrics table and the registry differ"
        );
        // Labelled counters show their known label values at 0 before anything happened, so
        // an alert's rate() sees 0, not "no data".
        for series in [
            "embedcar_shed_requests_total{reason=\"queue_full\"} 0",
            "embedcar_errors_total{reason=\"upstream_unreachable\"} 0",
            "embedcar_deadline_expired_total{kind=\"first_byte\"} 0",
            "embedcar_retries_total{reason=\"503\"} 0",
            "embedcar_circuit_breaker_transitions_total{state=\"open\"} 0",
            "embedcar_embeddings_tokens_total{source=\"cache\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing");
        }
        #[cfg(target_os = "linux")]
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_threads",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "missing {name}"
            );
        }
    }
}
