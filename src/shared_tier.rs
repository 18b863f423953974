//! The shared tier: what several replicas of embedcar (one per application pod) share through
//! Redis or Valkey, so that they act as one client of the upstream: a global rate gate per
//! credential (GCRA for requests and tokens, in one Lua script), the upstream's closures (a 429
//! seen by one replica holds them all until the reset), and a vector cache (L2) behind each
//! replica's in-process one.
//!
//! Redis trouble never becomes a caller's trouble: every command is bounded by
//! `redis.command_timeout`, and a breaker stops asking for `BREAKER_COOLDOWN` (then lets one
//! probe through) after the first command that timed out, or after `BREAKER_FAILURES` errors in
//! a row. While it is open the cache is
//! the in-process one alone and the gates are local ones with the budget divided by the
//! replicas last seen (each replica announces itself in a sorted set whose members expire), so
//! an outage does not multiply the budget by the number of replicas.
//!
//! Keys (all under `redis.key_prefix`): `gate:{FP}:r` / `gate:{FP}:t` (the request and token
//! buckets' theoretical arrival times, µs on the Redis clock), `gate:{FP}:closed` (closed
//! until, µs), `v:SCOPE+INPUT` (a vector), `replicas` (the heartbeat set). The `{FP}` hash tag
//! (the credential's fingerprint) keeps a script's keys in one Cluster slot; the client here
//! speaks to one node (or a managed primary endpoint), not to a Cluster.

use std::{
    fmt::Write as _,
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use redis::{aio::ConnectionManager, IntoConnectionInfo, Script};
use tokio::time::Instant;

use crate::{
    config::RedisConfig, embeddings::cache::Embedded, metrics::Metrics,
    upstream::credential::CredentialId,
};

/// Errors in a row after which the tier stops asking Redis. An error comes back at once and
/// costs a caller nothing; a timeout costs it `command_timeout`, and a request meets two
/// commands (its cache lookup, then its call's gate), so one timeout opens the breaker at once:
/// a request pays `command_timeout` at most, whatever Redis does.
pub const BREAKER_FAILURES: u32 = 3;
/// How long the tier does without Redis before one command probes it again.
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(2);
/// How often a replica announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A replica not heard from for this long no longer counts: a few missed heartbeats, so that
/// one slow beat does not halve everyone's fallback budget.
pub const REPLICA_TTL: Duration = Duration::from_secs(10);
/// Attempts to reconnect in the background after the connection broke, before the next
/// command starts again (callers never wait for them: `command_timeout` bounds every command).
const RECONNECT_ATTEMPTS: usize = 2;
/// Layout version of an L2 value, its first byte: a replica of another version reads a miss.
const VALUE_VERSION: u8 = 1;

/// GCRA over requests and tokens plus the upstream's closure, atomically: "go" (both buckets
/// updated) or "wait this long" (nothing spent). The arithmetic is governor's, which the local
/// gates use: burst = the per-minute count, tau = T * (burst - 1), n cells need
/// tat + T*(n-1) - tau <= now and advance tat to max(tat, now) + T*n.
///
/// KEYS: request TAT, token TAT, closed-until. ARGV: request interval µs (0: no limit),
/// request burst, token interval µs (0: no limit), token burst, tokens, now µs ("" = the
/// server's clock; tests pass their own). Reply: {wait µs (0 = go), 1 if the upstream closed it}.
/// Numbers go back into Redis with %d: Lua's default formatting would round them to 14 digits.
const GATE_SCRIPT: &str = r"
local now
if ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local closed = tonumber(redis.call('GET', KEYS[3]) or 0)
if closed > now then
  return {closed - now, 1}
end
local function gcra(key, t, burst, n)
  local tat = tonumber(redis.call('GET', key) or now)
  local extra = t * (n - 1)
  local earliest = tat + extra - t * (burst - 1)
  if now < earliest then
    return earliest - now, nil
  end
  return 0, math.max(tat, now) + t + extra
end
local wait = 0
local next_r, next_t
local rt, rb = tonumber(ARGV[1]), tonumber(ARGV[2])
if rt > 0 then
  local w
  w, next_r = gcra(KEYS[1], rt, rb, 1)
  if w > wait then wait = w end
end
local tt, tb, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if tt > 0 then
  local w
  w, next_t = gcra(KEYS[2], tt, tb, n)
  if w > wait then wait = w end
end
if wait > 0 then
  return {wait, 0}
end
if next_r then
  redis.call('SET', KEYS[1], string.format('%d', next_r), 'PX', string.format('%d', math.ceil((next_r - now) / 1000) + 1))
end
if next_t then
  redis.call('SET', KEYS[2], string.format('%d', next_t), 'PX', string.format('%d', math.ceil((next_t - now) / 1000) + 1))
end
return {0, 0}
";

/// Closes a credential's gate for ARGV[1] µs from now on the Redis clock; a shorter closure
/// never shortens a longer one.
const SHUT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local for_ = tonumber(ARGV[1])
local until_ = now + for_
local cur = tonumber(redis.call('GET', KEYS[1]) or 0)
if until_ > cur then
  redis.call('SET', KEYS[1], string.format('%d', until_), 'PX', string.format('%d', math.ceil(for_ / 1000) + 1))
end
return 1
";

/// Announces ARGV[1] in the replica set (scores: ms on the Redis clock), forgets those silent
/// for ARGV[2] ms, and answers how many are left.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
";

/// The operations, as their metric label.
#[derive(Clone, Copy)]
pub enum Op {
    Gate,
    Shut,
    Fetch,
    Store,
    Heartbeat,
}

impl Op {
    pub(crate) const ALL: [Op; 5] = [Op::Gate, Op::Shut, Op::Fetch, Op::Store, Op::Heartbeat];
    pub(crate) fn label(self) -> &'static str {
        match self {
            Op::Gate => "gate",
            Op::Shut => "shut",
            Op::Fetch => "fetch",
            Op::Store => "store",
            Op::Heartbeat => "heartbeat",
        }
    }
}

/// The tier's breaker: closed (asking Redis), open (not asking until a time), or probing (one
/// command is finding out).
enum Mode {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is out; if it never reports (its caller went away), another may go at `until`.
    Probing {
        until: Instant,
    },
}

/// What the global gate answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAnswer {
    Go,
    /// Come back after this long; `closed` when the upstream's closure is the reason.
    Wait {
        wait: Duration,
        closed: bool,
    },
}

/// A gate's limits, as the script takes them (an interval of 0: no limit of that kind).
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    pub request_interval_us: u64,
    pub request_burst: u32,
    pub token_interval_us: u64,
    pub token_burst: u32,
}

impl GateLimits {
    /// governor's quota per minute: one cell every 60 s / n, a burst of n.
    pub fn per_minute(requests: u32, tokens: u32) -> GateLimits {
        let interval = |n: u32| if n == 0 { 0 } else { 60_000_000 / u64::from(n) };
        GateLimits {
            request_interval_us: interval(requests),
            request_burst: requests,
            token_interval_us: interval(tokens),
            token_burst: tokens,
        }
    }
}

pub struct SharedTier {
    conn: ConnectionManager,
    prefix: String,
    command_timeout: Duration,
    mode: Mutex<Mode>,
    /// Whether the last command answered (for `/readyz` when `redis.required`).
    reachable: AtomicBool,
    replicas: AtomicU32,
    replica_id: String,
    gate: Script,
    shut: Script,
    heartbeat: Script,
    pub shares_cache: bool,
    pub shares_gates: bool,
    pub required: bool,
    metrics: Arc<Metrics>,
}

impl SharedTier {
    /// Connects lazily: nothing waits for Redis at start, and a Redis that is down at start is
    /// the same as one that goes down later.
    pub fn new(
        config: &RedisConfig,
        cache_enabled: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<SharedTier>>, crate::Error> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        let mut info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("redis.url: {e}"))?;
        if let Some(password) = password(config)? {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| format!("redis.url: {e}"))?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(RECONNECT_ATTEMPTS);
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| format!("redis: {e}"))?;
        Ok(Some(Arc::new(SharedTier {
            conn,
            prefix: config.key_prefix.clone(),
            command_timeout: config.command_timeout,
            mode: Mutex::new(Mode::Closed { failures: 0 }),
            reachable: AtomicBool::new(false),
            replicas: AtomicU32::new(0),
            replica_id: uuid::Uuid::new_v4().to_string(),
            gate: Script::new(GATE_SCRIPT),
            shut: Script::new(SHUT_SCRIPT),
            heartbeat: Script::new(HEARTBEAT_SCRIPT),
            shares_cache: config.shared_cache && cache_enabled,
            shares_gates: config.shared_gates,
            required: config.required,
            metrics,
        })))
    }

    /// Whether the last command to Redis answered.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Replicas heard from recently, this one included; 1 before the first count.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Whether the breaker lets a command go now.
    fn admit(&self) -> bool {
        let now = Instant::now();
        let mut mode = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        match *mode {
            Mode::Closed { .. } => true,
            Mode::Open { until } | Mode::Probing { until } if now >= until => {
                *mode = Mode::Probing {
                    until: now + self.command_timeout * 2,
                };
                true
            }
            Mode::Open { .. } | Mode::Probing { .. } => false,
        }
    }

    fn succeeded(&self) {
        self.reachable.store(true, Ordering::Relaxed);
        let mut mode = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*mode, Mode::Closed { failures: 0 }) {
            if !matches!(*mode, Mode::Closed { .. }) {
                tracing::info!("redis answers again: sharing resumes");
                self.metrics.redis.fallback.set(0);
            }
            *mode = Mode::Closed { failures: 0 };
        }
    }

    fn failed(&self, timed_out: bool) {
        self.reachable.store(false, Ordering::Relaxed);
        let now = Instant::now();
        let mut mode = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        match *mode {
            Mode::Closed { failures } if !timed_out && failures + 1 < BREAKER_FAILURES => {
                *mode = Mode::Closed {
                    failures: failures + 1,
                };
            }
            Mode::Closed { .. } => {
                tracing::warn!(
                    cooldown = ?BREAKER_COOLDOWN,
                    "redis keeps failing: doing without it (local gates with a divided budget, in-process cache only)"
                );
                self.metrics.redis.fallback.set(1);
                *mode = Mode::Open {
                    until: now + BREAKER_COOLDOWN,
                };
            }
            Mode::Probing { .. } => {
                *mode = Mode::Open {
                    until: now + BREAKER_COOLDOWN,
                };
            }
            Mode::Open { .. } => {}
        }
    }

    /// Runs one command within `command_timeout`, if the breaker allows; `None` when it failed,
    /// timed out or was not sent.
    async fn run<T>(
        &self,
        op: Op,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        if !self.admit() {
            self.metrics.redis.skipped.inc();
            return None;
        }
        let started = Instant::now();
        match tokio::time::timeout(self.command_timeout, command).await {
            Ok(Ok(value)) => {
                self.metrics
                    .redis
                    .command_seconds
                    .with_label_values(&[op.label()])
                    .observe(started.elapsed().as_secs_f64());
                self.succeeded();
                Some(value)
            }
            Ok(Err(e)) => {
                tracing::debug!(op = op.label(), error = %e, "redis command failed");
                self.metrics
                    .redis
                    .errors
                    .with_label_values(&[op.label(), "error"])
                    .inc();
                self.failed(false);
                None
            }
            Err(_) => {
                self.metrics
                    .redis
                    .errors
                    .with_label_values(&[op.label(), "timeout"])
                    .inc();
                self.failed(true);
                None
            }
        }
    }

    fn gate_key(&self, credential: &CredentialId, which: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 80);
        key.push_str(&self.prefix);
        key.push_str("gate:{");
        for b in credential {
            let _ = write!(key, "{b:02x}");
        }
        key.push('}');
        key.push_str(which);
        key
    }

    fn vector_key(&self, (scope, input): (u128, u128)) -> String {
        format!("{}v:{scope:032x}{input:032x}", self.prefix)
    }

    /// Asks the global gate for one upstream call of `tokens` tokens. `None`: Redis could not
    /// be asked (the caller falls back to local gates).
    pub async fn gate(
        &self,
        credential: &CredentialId,
        limits: GateLimits,
        tokens: u64,
    ) -> Option<GateAnswer> {
        self.gate_at(credential, limits, tokens, None).await
    }

    /// `gate` on a clock of the caller's choosing (µs), for tests of the arithmetic.
    pub async fn gate_at(
        &self,
        credential: &CredentialId,
        limits: GateLimits,
        tokens: u64,
        now_us: Option<u64>,
    ) -> Option<GateAnswer> {
        // As the local gate: a call larger than a minute's budget goes as a full minute's worth.
        let cells = tokens.clamp(1, u64::from(limits.token_burst.max(1)));
        let mut invocation = self.gate.prepare_invoke();
        invocation
            .key(self.gate_key(credential, ":r"))
            .key(self.gate_key(credential, ":t"))
            .key(self.gate_key(credential, ":closed"))
            .arg(limits.request_interval_us)
            .arg(limits.request_burst)
            .arg(limits.token_interval_us)
            .arg(limits.token_burst)
            .arg(cells)
            .arg(now_us.map_or(String::new(), |n| n.to_string()));
        let mut conn = self.conn.clone();
        let (wait_us, closed): (u64, u8) = self
            .run(Op::Gate, invocation.invoke_async(&mut conn))
            .await?;
        Some(if wait_us == 0 {
            GateAnswer::Go
        } else {
            GateAnswer::Wait {
                wait: Duration::from_micros(wait_us),
                closed: closed == 1,
            }
        })
    }

    /// Tells every replica that the upstream closed `credential`'s gate for `for_`; written in
    /// the background, so the caller who saw the 429 does not wait for it.
    pub fn publish_shut(self: &Arc<Self>, credential: &CredentialId, for_: Duration) {
        let tier = self.clone();
        let key = self.gate_key(credential, ":closed");
        let micros = u64::try_from(for_.as_micros()).unwrap_or(u64::MAX);
        tokio::spawn(async move {
            let mut invocation = tier.shut.prepare_invoke();
            invocation.key(key).arg(micros);
            let mut conn = tier.conn.clone();
            let _: Option<i64> = tier.run(Op::Shut, invocation.invoke_async(&mut conn)).await;
        });
    }

    /// The shared cache's entries for `keys`, in one MGET; all misses if Redis could not be
    /// asked.
    pub async fn fetch(&self, keys: &[(u128, u128)]) -> Vec<Option<Embedded>> {
        let mut found = Vec::with_capacity(keys.len());
        let mut cmd = redis::cmd("MGET");
        for k in keys {
            cmd.arg(self.vector_key(*k));
        }
        let mut conn = self.conn.clone();
        let values: Option<Vec<Option<Vec<u8>>>> = self
            .run(Op::Fetch, cmd.query_async(&mut conn))
            .await
            .filter(|v: &Vec<Option<Vec<u8>>>| v.len() == keys.len());
        match values {
            Some(values) => found.extend(values.into_iter().map(|v| v.and_then(|v| decode(&v)))),
            None => found.resize_with(keys.len(), || None),
        }
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        self.metrics.redis.l2_hits.inc_by(hits);
        self.metrics
            .redis
            .l2_misses
            .inc_by(keys.len() as u64 - hits);
        found
    }

    /// Writes the upstream's answers to the shared cache, pipelined and in the background.
    pub fn store(self: &Arc<Self>, entries: Vec<((u128, u128), Arc<Embedded>)>, ttl: Duration) {
        if entries.is_empty() {
            return;
        }
        let tier = self.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            for (key, embedded) in &entries {
                pipe.cmd("SET")
                    .arg(tier.vector_key(*key))
                    .arg(encode(embedded))
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            }
            let mut conn = tier.conn.clone();
            let _: Option<()> = tier.run(Op::Store, pipe.exec_async(&mut conn)).await;
        });
    }

    /// Announces this replica and counts the others until `stop`; then leaves the set, so the
    /// others' fallback budget grows at once rather than after `REPLICA_TTL`.
    pub async fn heartbeat(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let key = format!("{}replicas", self.prefix);
        let ttl_ms = REPLICA_TTL.as_millis() as u64;
        loop {
            let mut invocation = self.heartbeat.prepare_invoke();
            invocation.key(&key).arg(&self.replica_id).arg(ttl_ms);
            let mut conn = self.conn.clone();
            if let Some(n) = self
                .run(Op::Heartbeat, invocation.invoke_async::<u32>(&mut conn))
                .await
            {
                self.replicas.store(n, Ordering::Relaxed);
                self.metrics.redis.replicas.set(i64::from(n));
            }
            tokio::select! {
                () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                () = &mut stop => break,
            }
        }
        let mut conn = self.conn.clone();
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(&key).arg(&self.replica_id);
        let _: Option<i64> = self.run(Op::Heartbeat, zrem.query_async(&mut conn)).await;
    }
}

/// The password named by `password_env` or `password_file`, if any.
fn password(config: &RedisConfig) -> Result<Option<String>, crate::Error> {
    if let Some(var) = &config.password_env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("redis.password_env: {var} is not set").into());
    }
    if let Some(path) = &config.password_file {
        return std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| format!("redis.password_file: cannot read {path}: {e}").into());
    }
    Ok(None)
}

/// An L2 value: version, tokens (u64 LE), model name (u16 LE length, then UTF-8), then the
/// vector as float32 LE: 4 bytes a dimension, a sixth of its JSON text.
pub fn encode(e: &Embedded) -> Vec<u8> {
    let model = e.model.as_bytes();
    let model = &model[..model.len().min(usize::from(u16::MAX))];
    let mut out = Vec::with_capacity(11 + model.len() + e.vector.len() * 4);
    out.push(VALUE_VERSION);
    out.extend_from_slice(&e.tokens.to_le_bytes());
    out.extend_from_slice(&(model.len() as u16).to_le_bytes());
    out.extend_from_slice(model);
    for x in e.vector.iter() {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The inverse of `encode`; `None` (a miss) for anything else.
pub fn decode(bytes: &[u8]) -> Option<Embedded> {
    let (&version, rest) = bytes.split_first()?;
    if version != VALUE_VERSION || rest.len() < 10 {
        return None;
    }
    let tokens = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let len = usize::from(u16::from_le_bytes(rest[8..10].try_into().ok()?));
    let rest = &rest[10..];
    if rest.len() < len || (rest.len() - len) % 4 != 0 {
        return None;
    }
    let model = std::str::from_utf8(&rest[..len]).ok()?;
    let vector: Box<[f32]> = rest[len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some(Embedded {
        vector,
        tokens,
        model: model.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_anything_else_is_a_miss() {
        let e = Embedded {
            vector: vec![0.25, -1.5, f32::MIN_POSITIVE].into_boxed_slice(),
            tokens: 7,
            model: "text-embedding-3-small".into(),
        };
        let bytes = encode(&e);
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back.vector, e.vector);
        assert_eq!(back.tokens, 7);
        assert_eq!(&*back.model, "text-embedding-3-small");
        assert!(decode(&bytes[..bytes.len() - 1]).is_none());
        assert!(decode(&[]).is_none());
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(decode(&other).is_none());
    }

    #[test]
    fn limits_per_minute_are_governors() {
        let l = GateLimits::per_minute(60, 0);
        assert_eq!(l.request_interval_us, 1_000_000);
        assert_eq!(l.request_burst, 60);
        assert_eq!(l.token_interval_us, 0);
    }
}
