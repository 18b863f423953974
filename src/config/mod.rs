//! The whole configuration: its defaults, where it is read from, and its checks.
//!
//! Sources, later ones winning: built-in defaults (the named constants below), a TOML file
//! (`--config PATH`), environment variables `EMBEDCAR_<SECTION>__<KEY>` (e.g.
//! `EMBEDCAR_UPSTREAM__CONNECT_TIMEOUT=3s`), then command-line flags. Every struct denies unknown
//! fields so that a typo is an error naming the key instead of a silently ignored setting.
//!
//! This folder sits under everything else: every part of the flow reads its settings from here
//! and nothing here depends on the flow. Durations as the config writes them (`90s`) and as
//! messages show them (`4.5s`) are in `durations`.

pub(crate) mod base_url;
pub mod durations;

use std::{net::SocketAddr, path::Path, time::Duration};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

/// Where the proxy listens. Loopback: a sidecar serves its own pod, not the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where health, readiness and metrics are served, apart from the traffic port so that a
/// saturated proxy still answers its probes.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Open client connections at most; beyond it new connections wait in the kernel backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// A client must send a request's headers within this time (also the keep-alive idle limit for
/// HTTP/1.1, which is how hyper applies it). Long enough for any honest client.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body accepted. Embedding requests are far smaller; the file-upload endpoints
/// that also pass through take parts of up to 64 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Request bytes held in memory at once over all requests (bodies the embeddings engine reads
/// whole, and small pass-through bodies kept for a retry): four of the largest bodies. Beyond
/// it a body is refused (503 + Retry-After) rather than let memory grow with the callers.
pub const DEFAULT_MAX_BUFFERED_REQUEST_BYTES: u64 = 256 * 1024 * 1024;
/// How long in-flight requests (streams included) may take to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// OpenAI itself. Requests keep their path: `/v1/embeddings` goes to `{url}/v1/embeddings`.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.openai.com";
/// TCP + TLS connect budget; a healthy upstream connects in well under a second.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to the upstream's response headers. Generous because non-streamed completions of long
/// answers take minutes; streamed answers send headers at once.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest silence between two chunks of a body (either direction) before the exchange is
/// abandoned: a stream that keeps moving may last as long as it likes.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Idle pooled upstream connections are closed after this, below the 5-minute idle limit that
/// common load balancers in front of APIs apply, so we close first rather than reuse a dead one.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 256;

/// Concurrent upstream requests at most: what protects the upstream (and the caller's rate
/// limits) from a burst of callers.
pub const DEFAULT_MAX_CONCURRENCY: usize = 256;
/// How long a request may wait for a free upstream slot before it is shed with 503: long enough
/// to ride out a burst, short enough that the caller's own retry logic still has time.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);

/// Configuration of the whole process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub credentials: CredentialsConfig,
    pub embeddings: EmbeddingsConfig,
    pub cache: CacheConfig,
    pub redis: RedisConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_connections: usize,
    #[serde(with = "crate::config::durations::serde")]
    pub header_read_timeout: Duration,
    pub max_body_bytes: u64,
    /// Request bytes held in memory at once, over all requests.
    pub max_buffered_request_bytes: u64,
    #[serde(with = "crate::config::durations::serde")]
    pub shutdown_grace: Duration,
    /// Async worker threads; 0 = one per CPU the process may use (its affinity / cgroup share).
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL: scheme, host, optional port and optional path prefix.
    pub url: String,
    #[serde(with = "crate::config::durations::serde")]
    pub connect_timeout: Duration,
    #[serde(with = "crate::config::durations::serde")]
    pub first_byte_timeout: Duration,
    #[serde(with = "crate::config::durations::serde")]
    pub body_idle_timeout: Duration,
    #[serde(with = "crate::config::durations::serde")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Upstream requests in flight at most (pass-through and embeddings together); for
    /// embeddings calls the ceiling of the adaptive limit.
    pub max_concurrency: usize,
    /// Learn how many embeddings calls the upstream takes at once (from latency and overload
    /// answers) instead of sending up to `max_concurrency`.
    pub adaptive_concurrency: bool,
    #[serde(with = "crate::config::durations::serde")]
    pub max_wait: Duration,
    /// The embeddings engine's deadline, shortened by the client's own
    /// `x-stainless-read-timeout` / `x-stainless-timeout` hint: embeddings get their vectors
    /// (queueing, gates, retries included) or a 504 by then. Pass-through requests wait for
    /// the upstream's answer as long as `upstream.first_byte_timeout` and the client's hint
    /// allow (a completion may take minutes); for them this bounds only embedcar's own waits
    /// (gate, slot, the start of a retry).
    #[serde(with = "crate::config::durations::serde")]
    pub request_timeout: Duration,
    /// Per upstream credential; 0 = no limit.
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    /// Embeddings inputs waiting for an upstream call at most; beyond, 503 at once.
    pub max_queued_inputs: usize,
    /// Pass-through requests waiting for an upstream slot at most; beyond, 503 at once.
    pub max_waiting_requests: usize,
}

/// Retries of upstream calls (embeddings calls, and pass-through requests whose body was small
/// enough to keep).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per call, the first included; 1 = no retries.
    pub max_attempts: u32,
    #[serde(with = "crate::config::durations::serde")]
    pub base_backoff: Duration,
    #[serde(with = "crate::config::durations::serde")]
    pub max_backoff: Duration,
    /// Cap on a delay the upstream asks for (Retry-After, retry-after-ms, rate-limit resets).
    #[serde(with = "crate::config::durations::serde")]
    pub max_server_delay: Duration,
    /// Retries may add this share of the recent request rate...
    #[serde(serialize_with = "f32_as_written")]
    pub budget_ratio: f32,
    /// ...plus this many per second.
    pub budget_min_per_second: u32,
    /// Pass-through request bodies up to this size are kept so the request can be retried.
    pub max_buffered_body: u64,
    /// Add `x-should-retry: false` to a failure embedcar already retried (or chose not to), so
    /// the official clients do not retry it again.
    pub should_retry_header: bool,
}

/// The upstream circuit breaker: it opens only when the upstream looks down (see
/// `src/resilience/breaker.rs` for why it is this reluctant).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub enabled: bool,
    /// Share of a credential's calls in the window that failed (5xx, broken exchanges, the
    /// upstream's own timeouts) at which its calls are refused for a while.
    pub failure_rate: f64,
    /// Calls in the window before the rate counts.
    pub min_calls: u32,
    #[serde(with = "crate::config::durations::serde")]
    pub window: Duration,
    /// Connection failures in a row (for everyone) that open it for everyone.
    pub connect_failures: u32,
    /// How long it stays open before a probe.
    #[serde(with = "crate::config::durations::serde")]
    pub cooldown: Duration,
}

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_QUEUED_INPUTS: usize = 100_000;
pub const DEFAULT_MAX_WAITING_REQUESTS: usize = 1024;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_BASE_BACKOFF: Duration = Duration::from_millis(250);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(8);
pub const DEFAULT_MAX_SERVER_DELAY: Duration = Duration::from_secs(30);
pub const DEFAULT_BUDGET_RATIO: f32 = 0.2;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_MAX_BUFFERED_BODY: u64 = 256 * 1024;
/// Nearly every call failing: an upstream that answers even one call in five is kept in
/// service (retries get through), as nginx and Envoy keep their last host.
pub const DEFAULT_BREAKER_FAILURE_RATE: f64 = 0.9;
pub const DEFAULT_BREAKER_MIN_CALLS: u32 = 20;
pub const DEFAULT_BREAKER_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_BREAKER_CONNECT_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(5);

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            base_backoff: DEFAULT_BASE_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_server_delay: DEFAULT_MAX_SERVER_DELAY,
            budget_ratio: DEFAULT_BUDGET_RATIO,
            budget_min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
            max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            should_retry_header: true,
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_rate: DEFAULT_BREAKER_FAILURE_RATE,
            min_calls: DEFAULT_BREAKER_MIN_CALLS,
            window: DEFAULT_BREAKER_WINDOW,
            connect_failures: DEFAULT_BREAKER_CONNECT_FAILURES,
            cooldown: DEFAULT_BREAKER_COOLDOWN,
        }
    }
}

/// How often a held key's file is read for a new key. Kubernetes takes up to a minute or so
/// to project an updated Secret; a couple of seconds more is lost in the noise, and a read of
/// a tiny file this often costs nothing.
pub const DEFAULT_KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Where embedcar's own upstream key comes from, if it holds one. The key itself never appears
/// in the config file: only the name of the variable or file that holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    /// Name of an environment variable holding the key, e.g. "OPENAI_API_KEY".
    pub api_key_env: Option<String>,
    /// Path of a file holding the key (a mounted Kubernetes secret); surrounding whitespace is
    /// ignored.
    pub api_key_file: Option<String>,
    /// Header the key is sent in: `authorization` (`Bearer KEY`, OpenAI) or `api-key` (Azure).
    pub header: CredentialHeader,
    /// How often `api_key_file` is read for a rotated key; 0 = read once at start only.
    #[serde(with = "crate::config::durations::serde")]
    pub reload_interval: Duration,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        Self {
            api_key_env: None,
            api_key_file: None,
            header: CredentialHeader::default(),
            reload_interval: DEFAULT_KEY_RELOAD_INTERVAL,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialHeader {
    #[default]
    Authorization,
    ApiKey,
}

/// The embeddings engine: coalescing, batching, formats, limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingsConfig {
    /// Off: `POST /v1/embeddings` passes through like any other path.
    pub enabled: bool,
    /// What embedcar asks the upstream for. `base64` is compact and exact; `float` is for
    /// OpenAI-compatible servers that lack base64.
    pub upstream_encoding: UpstreamEncoding,
    pub max_inputs_per_call: usize,
    pub max_tokens_per_call: u64,
    /// Per-input token limit of the models, checked before batching so that one caller's
    /// oversized input cannot fail a merged call.
    pub max_input_tokens: u64,
    /// Extra wait before sending a batch, to gather more inputs. 0: idle traffic sees no delay.
    #[serde(with = "crate::config::durations::serde")]
    pub linger: Duration,
    /// Split a request over the per-call input or token cap into several calls (else it passes
    /// through for the upstream to judge).
    pub split_oversized: bool,
    /// Headers that differ per request, attempt or client build without changing the answer:
    /// left out when deciding whether two callers may share an upstream call. A trailing `*`
    /// matches a prefix.
    pub ignore_headers: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamEncoding {
    #[default]
    Base64,
    Float,
}

/// The in-process cache of vectors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Bound on the vectors held, in bytes (4 per dimension plus a small overhead per entry).
    pub max_bytes: u64,
    #[serde(with = "crate::config::durations::serde")]
    pub ttl: Duration,
    /// Let callers with different credentials, organizations or projects share entries. Off:
    /// tenants never see each other's cache.
    pub share_across_credentials: bool,
}

pub const DEFAULT_MAX_INPUTS_PER_CALL: usize = 2048;
pub const DEFAULT_MAX_TOKENS_PER_CALL: u64 = 300_000;
pub const DEFAULT_MAX_INPUT_TOKENS: u64 = 8192;
pub const DEFAULT_LINGER: Duration = Duration::ZERO;
/// Per-request, per-attempt and per-build headers of the official clients and of tracing.
pub const DEFAULT_IGNORE_HEADERS: &[&str] = &[
    "user-agent",
    "x-stainless-*",
    "x-request-id",
    "x-client-request-id",
    "idempotency-key",
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-*",
    "sentry-trace",
    "x-datadog-*",
    "x-amzn-trace-id",
    "x-cloud-trace-context",
    "accept",
    "accept-encoding",
    "accept-language",
    "content-type",
    "content-length",
];
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(3600);

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            upstream_encoding: UpstreamEncoding::Base64,
            max_inputs_per_call: DEFAULT_MAX_INPUTS_PER_CALL,
            max_tokens_per_call: DEFAULT_MAX_TOKENS_PER_CALL,
            max_input_tokens: DEFAULT_MAX_INPUT_TOKENS,
            linger: DEFAULT_LINGER,
            split_oversized: true,
            ignore_headers: DEFAULT_IGNORE_HEADERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            ttl: DEFAULT_CACHE_TTL,
            share_across_credentials: false,
        }
    }
}

/// The shared tier for many replicas: rate gates and a vector cache in Redis (or Valkey), so
/// that replicas act as one client of the upstream. No `url`: no Redis, each replica alone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://` (TLS). The password comes from `password_env` or
    /// `password_file`, not from here.
    pub url: Option<String>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Path of a file holding the password (a mounted Secret); surrounding whitespace ignored.
    pub password_file: Option<String>,
    /// Prepended to every key, so that several deployments can share one Redis.
    pub key_prefix: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Every command's bound: what Redis trouble may add to a request, at most, before the
    /// tier's breaker stops asking.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// The L2 vector cache behind the in-process one.
    pub shared_cache: bool,
    /// The global rate gates, and the upstream's closures shared between replicas.
    pub shared_gates: bool,
    /// Whether `/readyz` fails while Redis cannot be reached. Off: an outage costs only the
    /// sharing.
    pub required: bool,
}

pub const DEFAULT_REDIS_KEY_PREFIX: &str = "embedcar:";
/// A connect within a datacentre takes milliseconds; this only bounds a reconnect, which runs
/// in the background (callers are bounded by `command_timeout`).
pub const DEFAULT_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A Redis round trip in the same zone is well under a millisecond; 50 ms is what a request
/// may lose to a Redis in trouble before the breaker stops asking, a small part of an
/// embeddings call's own hundreds of milliseconds.
pub const DEFAULT_REDIS_COMMAND_TIMEOUT: Duration = Duration::from_millis(50);

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            password_env: None,
            password_file: None,
            key_prefix: DEFAULT_REDIS_KEY_PREFIX.to_string(),
            connect_timeout: DEFAULT_REDIS_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_REDIS_COMMAND_TIMEOUT,
            shared_cache: true,
            shared_gates: true,
            required: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter directive, e.g. "info" or "embedcar=debug,hyper=info".
    pub level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: parse_const_addr(DEFAULT_LISTEN),
            admin_listen: parse_const_addr(DEFAULT_ADMIN_LISTEN),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_buffered_request_bytes: DEFAULT_MAX_BUFFERED_REQUEST_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            worker_threads: 0,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_UPSTREAM_URL.to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            pool_max_idle_per_host: DEFAULT_POOL_MAX_IDLE_PER_HOST,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            adaptive_concurrency: true,
            max_wait: DEFAULT_MAX_WAIT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            requests_per_minute: 0,
            tokens_per_minute: 0,
            max_queued_inputs: DEFAULT_MAX_QUEUED_INPUTS,
            max_waiting_requests: DEFAULT_MAX_WAITING_REQUESTS,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: DEFAULT_LOG_LEVEL.to_string(),
        }
    }
}

/// An `f32` as its shortest decimal text (`0.2`), not widened to `f64` first, which TOML and
/// JSON would print as `0.20000000298023224`.
fn f32_as_written<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    let shortest: f64 = v.to_string().parse().unwrap_or(f64::from(*v));
    s.serialize_f64(shortest)
}

fn parse_const_addr(s: &str) -> SocketAddr {
    s.parse().expect("default addresses are valid constants")
}

/// Flags that override the file and the environment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// A configuration that could not be used, with the reason and the offending key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// The environment prefix; `EMBEDCAR_SECTION__KEY` sets `section.key`.
pub const ENV_PREFIX: &str = "EMBEDCAR_";

impl Config {
    /// Reads defaults, then the file (if any), then the `EMBEDCAR_` environment, then
    /// `overrides`, and checks the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only EMBEDCAR_<SECTION>__<KEY>: Kubernetes injects EMBEDCAR_PORT, EMBEDCAR_SERVICE_HOST
        // and the like into every pod when a Service named "embedcar" exists; those are not ours
        // (and a key with no section could not be valid anyway).
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                if !rest.contains("__") && rest != "CONFIG" {
                    eprintln!("embedcar: ignoring environment variable {name} (not {ENV_PREFIX}<SECTION>__<KEY>)");
                }
            }
        }
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError(flatten_figment_error(e)))?;
        config.apply(overrides);
        config.check()?;
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(a) = o.listen {
            self.server.listen = a;
        }
        if let Some(a) = o.admin_listen {
            self.server.admin_listen = a;
        }
        if let Some(u) = &o.upstream {
            self.upstream.url = u.clone();
        }
        if let Some(f) = o.log_format {
            self.log.format = f;
        }
    }

    /// Checks that go beyond types: values that parse but cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        base_url::BaseUrl::parse(&self.upstream.url)
            .map_err(|e| ConfigError(format!("upstream.url: {e}")))?;
        self.check_nonzero()?;
        self.check_retry_and_breaker()?;
        if self.server.max_buffered_request_bytes == 0 {
            return Err(ConfigError(
                "server.max_buffered_request_bytes: must be at least 1".into(),
            ));
        }
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError(
                "server.max_body_bytes: must be at least 1".into(),
            ));
        }
        if self.credentials.api_key_env.is_some() && self.credentials.api_key_file.is_some() {
            return Err(ConfigError(
                "credentials: set api_key_env or api_key_file, not both".into(),
            ));
        }
        self.check_redis()?;
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            return Err(ConfigError(
                "server.admin_listen: must differ from server.listen".into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError(format!("log.level: {e}")))?;
        Ok(())
    }

    /// Sizes and timeouts where 0 would refuse everything or never wait: must be at least 1,
    /// or longer than 0s.
    fn check_nonzero(&self) -> Result<(), ConfigError> {
        let positive = [
            ("server.max_connections", self.server.max_connections),
            ("limits.max_concurrency", self.limits.max_concurrency),
            (
                "embeddings.max_inputs_per_call",
                self.embeddings.max_inputs_per_call,
            ),
            (
                "embeddings.max_tokens_per_call",
                self.embeddings.max_tokens_per_call as usize,
            ),
            (
                "embeddings.max_input_tokens",
                self.embeddings.max_input_tokens as usize,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!("{key}: must be at least 1")));
            }
        }
        let durations = [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            (
                "upstream.first_byte_timeout",
                self.upstream.first_byte_timeout,
            ),
            (
                "upstream.body_idle_timeout",
                self.upstream.body_idle_timeout,
            ),
        ];
        for (key, value) in durations {
            if value.is_zero() {
                return Err(ConfigError(format!("{key}: must be longer than 0s")));
            }
        }
        Ok(())
    }

    /// The retry and breaker settings' ranges.
    fn check_retry_and_breaker(&self) -> Result<(), ConfigError> {
        if self.retry.max_attempts == 0 {
            return Err(ConfigError("retry.max_attempts: must be at least 1".into()));
        }
        if !(0.0..=1000.0).contains(&self.retry.budget_ratio) {
            return Err(ConfigError(
                "retry.budget_ratio: must be between 0 and 1000".into(),
            ));
        }
        if !(self.breaker.failure_rate > 0.0 && self.breaker.failure_rate <= 1.0) {
            return Err(ConfigError(
                "breaker.failure_rate: must be above 0 and at most 1".into(),
            ));
        }
        if self.breaker.window.is_zero() {
            return Err(ConfigError("breaker.window: must be longer than 0s".into()));
        }
        Ok(())
    }

    /// Values that work but are probably not what was meant: logged at start-up, printed by
    /// `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let base = base_url::BaseUrl::mask_userinfo(&self.upstream.url);
        if base.trim_end_matches('/').ends_with("/v1") {
            out.push(format!(
                "upstream.url ({base}) ends in /v1, and request paths keep their /v1: /v1/embeddings would go to {}/v1/embeddings; you probably want the URL without /v1",
                base.trim_end_matches('/')
            ));
        }
        out
    }

    fn check_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        if r.password_env.is_some() && r.password_file.is_some() {
            return Err(ConfigError(
                "redis: set password_env or password_file, not both".into(),
            ));
        }
        for (key, value) in [
            ("redis.connect_timeout", r.connect_timeout),
            ("redis.command_timeout", r.command_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError(format!("{key}: must be longer than 0s")));
            }
        }
        if let Some(url) = &r.url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError(
                    "redis.url: must start with redis:// or rediss:// (TLS)".into(),
                ));
            }
            redis::Client::open(url.as_str())
                .map_err(|e| ConfigError(format!("redis.url: {e}")))?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config`. Holds no secret: keys are only
    /// ever named by variable or file, and a URL's userinfo is masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.upstream.url = base_url::BaseUrl::mask_userinfo(&shown.upstream.url);
        shown.redis.url = shown
            .redis
            .url
            .map(|u| base_url::BaseUrl::mask_userinfo(&u));
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// One line per problem: `section.key: what is wrong (where it came from)`. Figment's own text
/// names environment keys in upper case and its profile; this names them as the file does.
fn flatten_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let what = describe(&e.kind);
            let mut line = if key.is_empty() {
                what
            } else {
                format!("{key}: {what}")
            };
            if let Some(md) = &e.metadata {
                if md.name.contains("environment") {
                    let var = format!("{ENV_PREFIX}{}", e.path.join("__").to_uppercase());
                    line.push_str(&format!(" (from environment variable {var})"));
                } else if let Some(source) = &md.source {
                    line.push_str(&format!(" (in {source})"));
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Figment's text for an error kind, without its backticks, which it nests (`expected \`one of
/// \`url\`, ...\``) and which read as noise on a terminal or in a log.
fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    let list = |names: &[&str]| names.join(", ");
    match kind {
        Kind::UnknownField(found, &[]) => {
            format!("unknown key \"{found}\"; this section takes no keys")
        }
        Kind::UnknownField(found, expected) => {
            format!(
                "unknown key \"{found}\"; expected one of {}",
                list(expected)
            )
        }
        Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value \"{found}\"; expected one of {}",
                list(expected)
            )
        }
        Kind::MissingField(name) => format!("missing key \"{name}\""),
        Kind::DuplicateField(name) => format!("key \"{name}\" given twice"),
        other => other.to_string().replace('`', ""),
    }
}

#[cfg(test)]
// figment's Jail closures return figment::Error, which is large; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    /// Loads `text` as the config file with `env` set, inside figment's Jail (a temporary
    /// directory and a private, serialized environment).
    fn load_toml(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let mut out = Err(String::new());
        Jail::expect_with(|jail| {
            jail.create_file("embedcar.toml", text)?;
            for (k, v) in env {
                jail.set_env(k, v);
            }
            out = Config::load(Some(Path::new("embedcar.toml")), &Overrides::default())
                .map_err(|e| e.to_string());
            Ok(())
        });
        out
    }

    #[test]
    fn no_file_and_no_environment_gives_the_defaults() {
        Jail::expect_with(|_| {
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c, Config::default());
            assert_eq!(c.upstream.url, DEFAULT_UPSTREAM_URL);
            Ok(())
        });
    }

    #[test]
    fn file_environment_and_flags_layer_in_that_order() {
        let c = load_toml(
            "[upstream]\nurl = \"http://file:1\"\nconnect_timeout = \"2s\"\n[limits]\nmax_concurrency = 3\n",
            &[
                ("EMBEDCAR_LIMITS__MAX_CONCURRENCY", "7"),
                ("EMBEDCAR_UPSTREAM__CONNECT_TIMEOUT", "250ms"),
            ],
        )
        .unwrap();
        assert_eq!(c.upstream.url, "http://file:1");
        assert_eq!(c.limits.max_concurrency, 7);
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
        Jail::expect_with(|jail| {
            jail.set_env("EMBEDCAR_UPSTREAM__URL", "http://env:3");
            let flags = Overrides {
                upstream: Some("http://flag:2".into()),
                ..Default::default()
            };
            let c = Config::load(None, &flags).map_err(|e| e.to_string())?;
            assert_eq!(c.upstream.url, "http://flag:2");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let e = load_toml("[upstream]\nconect_timeout = \"2s\"\n", &[]).unwrap_err();
        assert!(e.contains("conect_timeout"), "{e}");
        let e = load_toml("[upstrem]\n", &[]).unwrap_err();
        assert!(e.contains("upstrem"), "{e}");
        let e = load_toml("", &[("EMBEDCAR_LIMITS__MAX_CONCURENCY", "3")]).unwrap_err();
        assert!(e.contains("max_concurency"), "{e}");
    }

    #[test]
    fn errors_name_keys_and_values_without_nested_backticks() {
        let e = load_toml("[upstream]\nconect_timeout = \"2s\"\n", &[]).unwrap_err();
        assert!(!e.contains('`'), "{e}");
        assert!(
            e.contains("unknown key \"conect_timeout\"; expected one of url, connect_timeout"),
            "{e}"
        );
        let e = load_toml("[log]\nformat = \"xml\"\n", &[]).unwrap_err();
        assert!(!e.contains('`'), "{e}");
        assert!(e.contains("expected one of text, json"), "{e}");
        let e = load_toml("[limits]\nmax_concurrency = \"x\"\n", &[]).unwrap_err();
        assert!(!e.contains('`'), "{e}");
    }

    #[test]
    fn the_printed_configuration_shows_values_as_written() {
        let mut c = Config::default();
        c.upstream.pool_idle_timeout = Duration::from_secs(90);
        c.retry.budget_ratio = 0.2;
        let text = c.to_toml();
        assert!(text.contains("pool_idle_timeout = \"90s\""), "{text}");
        assert!(text.contains("budget_ratio = 0.2\n"), "{text}");
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn an_upstream_url_ending_in_v1_is_warned_about() {
        let mut c = Config::default();
        assert!(c.warnings().is_empty());
        c.upstream.url = "http://127.0.0.1:8000/v1".into();
        let w = c.warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("without /v1"), "{w:?}");
        c.upstream.url = "http://127.0.0.1:8000/v1/".into();
        assert_eq!(c.warnings().len(), 1);
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_key_and_the_reason() {
        let e = load_toml("[upstream]\nconnect_timeout = \"soon\"\n", &[]).unwrap_err();
        assert!(e.contains("upstream.connect_timeout"), "{e}");
        let e = load_toml("[limits]\nmax_concurrency = 0\n", &[]).unwrap_err();
        assert!(e.contains("limits.max_concurrency"), "{e}");
        let e = load_toml("[upstream]\nurl = \"ftp://x\"\n", &[]).unwrap_err();
        assert!(e.contains("upstream.url"), "{e}");
        // Variables with no section (Kubernetes' service links) are not configuration.
        assert!(load_toml("", &[("EMBEDCAR_PORT", "tcp://10.0.0.1:80")]).is_ok());
        let e = load_toml("", &[("EMBEDCAR_SERVER__LISTEN", "nowhere")]).unwrap_err();
        assert!(e.contains("server.listen"), "{e}");
        assert!(e.contains("EMBEDCAR_SERVER__LISTEN"), "{e}");
    }

    #[test]
    fn redis_is_off_unless_a_url_is_given_and_takes_the_environment_form() {
        assert_eq!(Config::default().redis.url, None);
        let c = load_toml(
            "",
            &[
                ("EMBEDCAR_REDIS__URL", "rediss://redis.example:6380/1"),
                ("EMBEDCAR_REDIS__COMMAND_TIMEOUT", "20ms"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.redis.url.as_deref(),
            Some("rediss://redis.example:6380/1")
        );
        assert_eq!(c.redis.command_timeout, Duration::from_millis(20));
        assert!(c.redis.shared_cache && c.redis.shared_gates && !c.redis.required);
        let e = load_toml("[redis]\nurl = \"http://redis:6379\"\n", &[]).unwrap_err();
        assert!(e.contains("redis.url"), "{e}");
        let e = load_toml(
            "[redis]\nurl = \"redis://r\"\npassword_env = \"A\"\npassword_file = \"/b\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("redis"), "{e}");
        let e = load_toml("[redis]\ncommand_timeout = \"0s\"\n", &[]).unwrap_err();
        assert!(e.contains("redis.command_timeout"), "{e}");
        let mut c = Config::default();
        c.redis.url = Some("redis://:s3cret@redis:6379".into());
        assert!(!c.to_toml().contains("s3cret"));
    }

    #[test]
    fn the_printed_configuration_masks_url_credentials_and_parses_back() {
        let mut c = Config::default();
        c.upstream.url = "https://user:s3cret@example.com/prefix".into();
        let text = c.to_toml();
        assert!(!text.contains("s3cret"), "{text}");
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.limits, c.limits);
    }
}
