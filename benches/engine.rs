//! The embeddings engine under load, measured side by side with a direct call.
//!
//! Run with `cargo bench --bench engine` (see benches/README.md).
//!
//! Three parts, one run:
//!
//! * **Fan-in** (the scenario): 1,000 callers each ask for one input at the same moment
//!   (`POST /v1/embeddings`, model `text-embedding-3-small`, `encoding_format: "base64"` as the
//!   official clients send, a distinct input per caller so neither the cache nor coalescing
//!   trivialises it). The upstream (the fake, 1536-dimension vectors) answers after 50 ms and
//!   serves at most 4 connections at once (`max_connections: Some(4)`: a fifth connection waits
//!   in the kernel backlog). Both paths run against the same fake, one after the other:
//!   - DIRECT: the callers share a client pool of 4 keep-alive connections to the upstream (a
//!     semaphore of 4, FIFO; a caller waits for a free connection). That is the best a direct
//!     client can do with 4 upstream slots: no connection set-up, no backlog. One request, one
//!     input, per upstream call.
//!   - EMBEDCAR: every caller has its own keep-alive connection to embedcar (opened before the
//!     clock starts, as 1,000 threads or processes each with a client would), embedcar runs with
//!     `EMBEDCAR_LIMITS__MAX_CONCURRENCY=4` and otherwise its defaults.
//!
//!   Figures: time until the last caller has its vector, each caller's latency from the common
//!   start (p50/p99/max), upstream embeddings calls and inputs (the fake's counters), the most
//!   upstream requests in flight at once, embeddings per second (callers / completion time), and
//!   embedcar's CPU time per caller. Every reply is checked afterwards against the vector the
//!   fake computes for that input.
//! * **Fan-in at the defaults** (issue #9): the same 1,000 callers against an upstream that works
//!   on 4 calls at once and queues the rest (`capacity: Some(4)`, no connection cap), direct
//!   (the same pool of 4 connections) and through embedcar started with no configuration at all:
//!   it is not told the capacity and learns it (the adaptive concurrency limit). The limit, the
//!   upstream calls in flight and the latencies are read every 5 ms and drawn as an SVG chart.
//!   Beside it, the adaptive limit's own CPU per upstream call, timed in this process.
//! * **Saturation**: embedcar's own CPU time per single-input base64 request through the engine,
//!   the pass-through benchmark's method: a closed loop of 64 keep-alive connections, each
//!   sending its next request as soon as the previous reply is read, the upstream answering at
//!   once (no connection cap), embedcar with its default configuration. Variants, a fresh
//!   embedcar each: every input distinct (every request a cache miss, sent upstream, batched
//!   with whatever else is queued when the dispatcher runs); the same with one input per
//!   upstream call (`EMBEDCAR_EMBEDDINGS__MAX_INPUTS_PER_CALL=1`, the worst case); the same
//!   with the fan-in's few upstream slots; and inputs drawn from 1,024 warmed ones (every
//!   request a cache hit, no upstream call). CPU time from embedcar's process CPU clock, peak
//!   memory from `VmHWM`.
//! * **Render**: microseconds to write one 1536-dimension vector (values in [-0.1, 0.1] from a
//!   deterministic generator, 256 different vectors in turn) as float JSON
//!   (`embedcar::embeddings::render::write_floats`, shortest round-trip float32 text) and as
//!   base64 (`write_base64`), and a whole one-vector reply each way (`render_reply`), in this
//!   process: the median (and the minimum) of 31 rounds of 1,000 vectors.
//!
//! Pinning as in benches/passthrough.rs: embedcar alone on core 0 (`taskset -c 0`), this
//! process (load generator, fake upstream, render loop) on core 1 (`sched_setaffinity` before
//! any other thread exists). Other load on the machine skews the figures: each run compares the
//! cores' busy time (/proc/stat) with our processes' own and prints a warning when they differ by
//! more than 10% of a core (plus two clock ticks of slack for short windows); a render figure
//! whose median is far above its minimum is flagged too.
//!
//! Environment: `BENCH_CALLERS` (default 1000), `BENCH_DELAY_MS` (50), `BENCH_SLOTS` (4),
//! `BENCH_DIMS` (1536), `BENCH_SECONDS` (measured seconds per saturation run, default 8),
//! `BENCH_WARMUP_SECONDS` (1.5), `BENCH_CONNECTIONS` (64), `BENCH_HOT_INPUTS` (1024),
//! `BENCH_PIN=0` (do not pin), `BENCH_PARTS` (a comma list of `render`, `fanin`,
//! `fanin-defaults`, `adaptive`, `misses`, `one-per-call`, `few-slots`, `hits`; default all),
//! `BENCH_CHART` (where the defaults fan-in's chart goes, default
//! `target/bench-adaptive-limit.svg`), `BENCH_EMBEDCAR_BIN` (measure that binary instead). `EMBEDCAR_*` variables reach embedcar (the fan-in run sets
//! `EMBEDCAR_LIMITS__MAX_CONCURRENCY` itself).
//!
//! It exits non-zero only when the measurement itself broke (embedcar did not start or died,
//! a run hung, a reply carried a wrong vector, more than 1% errors); a missed target is
//! reported, not failed.

mod support;
use support::*;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use embedcar::embeddings::render::{render_reply, write_base64, write_floats};
use embedcar::embeddings::request::Encoding;
use fake_openai::{Behavior, EmbeddingInput, FakeOptions, FakeUpstream};
use hdrhistogram::Histogram;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const MODEL: &str = "text-embedding-3-small";
const AUTH: &str = "Bearer sk-bench";
const ROUTE: &str = "/v1/embeddings";

/// The targets.
const TARGET_CALLERS_PER_CALL: f64 = 20.0;
const TARGET_SPEEDUP: f64 = 10.0;
const TARGET_CPU_US: f64 = 40.0;
const TARGET_FLOAT_US: f64 = 15.0;
/// The adaptive concurrency limit's own CPU per upstream call (a place taken and given back
/// with a judgement).
const TARGET_ADAPTIVE_NS: f64 = 1000.0;
/// The fan-in pair where the upstream works on `slots` calls and queues the rest, and embedcar
/// runs at its defaults (not told the capacity).
const DIRECT_QUEUED: &str = "direct, queueing upstream";
const THROUGH_DEFAULTS: &str = "embedcar, defaults";

/// A render figure whose median is this much above its minimum was disturbed.
const MAX_RENDER_SPREAD: f64 = 1.25;

/// Latencies are recorded in nanoseconds, up to ten minutes, 3 significant digits.
const HIST_MAX_NS: u64 = 600_000_000_000;

/// Vectors in turn in the render loop, so that it does not render one vector from cache.
const RENDER_VECTORS: usize = 256;
const RENDER_ROUNDS: usize = 31;
const RENDER_ITERS: usize = 1000;

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

struct Settings {
    callers: usize,
    delay: Duration,
    slots: usize,
    dims: usize,
    measure: Duration,
    warmup: Duration,
    connections: usize,
    hot_inputs: usize,
    pin: bool,
    render_rounds: usize,
    render_iters: usize,
    /// The parts to run (`BENCH_PARTS`, default all): `render`, `fanin`, and the saturation
    /// variants `misses`, `one-per-call`, `few-slots`, `hits`.
    parts: Vec<String>,
    /// `cargo test --benches` runs this without `--bench`: a short smoke run, no verdicts.
    smoke: bool,
}

impl Settings {
    /// Whether `part` is to run: every part unless `BENCH_PARTS` names some.
    fn runs(&self, part: &str) -> bool {
        self.parts.is_empty() || self.parts.iter().any(|p| p == part)
    }

    fn from_env() -> Settings {
        let smoke = !std::env::args().any(|a| a == "--bench");
        let secs = |name: &str, default: f64| {
            let v = std::env::var(name)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|v| *v > 0.0 && v.is_finite())
                .unwrap_or(default);
            Duration::from_secs_f64(v)
        };
        let count = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let mut s = Settings {
            callers: count("BENCH_CALLERS", 1000),
            delay: Duration::from_millis(count("BENCH_DELAY_MS", 50) as u64),
            slots: count("BENCH_SLOTS", 4),
            dims: count("BENCH_DIMS", 1536),
            measure: secs("BENCH_SECONDS", 8.0),
            warmup: secs("BENCH_WARMUP_SECONDS", 1.5),
            connections: count("BENCH_CONNECTIONS", 64),
            hot_inputs: count("BENCH_HOT_INPUTS", 1024),
            pin: std::env::var("BENCH_PIN").map_or(true, |v| v != "0"),
            render_rounds: RENDER_ROUNDS,
            render_iters: RENDER_ITERS,
            parts: std::env::var("BENCH_PARTS")
                .map(|v| v.split(',').map(|p| p.trim().to_string()).collect())
                .unwrap_or_default(),
            smoke,
        };
        if smoke {
            s.callers = s.callers.min(40);
            s.measure = Duration::from_millis(300);
            s.warmup = Duration::from_millis(100);
            s.hot_inputs = s.hot_inputs.min(64);
            s.render_rounds = 3;
            s.render_iters = 20;
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Pinning and /proc readings (as in benches/passthrough.rs)
// ---------------------------------------------------------------------------------------------

/// The calling thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0)
}

/// utime + stime of a whole process, in clock ticks (a cross-check of [`cpu_ns`]).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces): state is field 3,
    // utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A reading of the machine and of embedcar at one instant: the start or end of a window.
struct Snapshot {
    at: Instant,
    self_ns: u64,
    proxy_ns: Option<u64>,
    proxy_ticks: Option<u64>,
    cores: Vec<u64>,
    upstream_calls: usize,
    upstream_inputs: usize,
    completed: u64,
    hits: u64,
}

impl Snapshot {
    fn take(proxy: Option<u32>, fake: &FakeUpstream, counters: Option<&Counters>) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            self_ns: cpu_ns(0).unwrap_or(0),
            proxy_ns: proxy.and_then(cpu_ns),
            proxy_ticks: proxy.and_then(cpu_ticks),
            cores: core_busy_ticks(),
            upstream_calls: fake.embedding_calls(),
            upstream_inputs: fake.embedding_inputs(),
            completed: counters.map_or(0, |c| c.completed.load(Ordering::Relaxed)),
            hits: counters.map_or(0, |c| c.hits.load(Ordering::Relaxed)),
        }
    }
}

/// What happened on the machine between two snapshots.
struct Window {
    seconds: f64,
    /// embedcar's CPU time in the window (process CPU clock), nanoseconds.
    proxy_ns: Option<f64>,
    /// The same from /proc/<pid>/stat ticks, nanoseconds.
    proxy_stat_ns: Option<f64>,
    /// This process's CPU time / wall time (load generator + fake upstream, core 1).
    self_util: f64,
    /// Whole-core busy time / wall time, per core.
    cores_util: Vec<f64>,
    upstream_calls: usize,
    upstream_inputs: usize,
    completed: u64,
    hits: u64,
}

impl Window {
    fn between(a: &Snapshot, b: &Snapshot) -> Window {
        let tck = clk_tck();
        let seconds = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let proxy_ns = match (a.proxy_ns, b.proxy_ns) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64),
            _ => None,
        };
        let proxy_stat_ns = match (a.proxy_ticks, b.proxy_ticks) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / tck * 1e9),
            _ => None,
        };
        Window {
            seconds,
            proxy_ns,
            proxy_stat_ns,
            self_util: b.self_ns.saturating_sub(a.self_ns) as f64 / 1e9 / seconds,
            cores_util: a
                .cores
                .iter()
                .zip(&b.cores)
                .map(|(x, y)| y.saturating_sub(*x) as f64 / tck / seconds)
                .collect(),
            upstream_calls: b.upstream_calls.saturating_sub(a.upstream_calls),
            upstream_inputs: b.upstream_inputs.saturating_sub(a.upstream_inputs),
            completed: b.completed.saturating_sub(a.completed),
            hits: b.hits.saturating_sub(a.hits),
        }
    }

    fn proxy_util(&self) -> f64 {
        self.proxy_ns.map_or(0.0, |ns| ns / 1e9 / self.seconds)
    }

    /// A warning when other processes (or interrupts) used the pinned cores noticeably during
    /// the window. /proc/stat counts in ticks, so short windows get two ticks of slack.
    fn disturbance(&self, label: &str, pinned: bool) -> Option<String> {
        let slack = MAX_FOREIGN_LOAD + 2.0 / clk_tck() / self.seconds;
        let proxy = self.proxy_util();
        if !pinned {
            let other = self.cores_util.iter().sum::<f64>() - proxy - self.self_util;
            return (other > slack).then(|| {
                format!(
                    "warning: during {label}, other processes or interrupts took {:.0}% of a \
                     core: its figures are disturbed",
                    other * 100.0
                )
            });
        }
        let other = |core: usize, ours: f64| {
            self.cores_util
                .get(core)
                .map_or(0.0, |busy| (busy - ours).max(0.0))
        };
        // A direct run does not use core 0 (only embedcar lives there).
        let core0 = match self.proxy_ns {
            Some(_) => other(EMBEDCAR_CORE, proxy),
            None => 0.0,
        };
        let core1 = other(BENCH_CORE, self.self_util);
        (core0.max(core1) > slack).then(|| {
            format!(
                "warning: during {label}, other processes or interrupts took {:.0}% of core 0 \
                 and {:.0}% of core 1 ({:.2} s window): its figures are disturbed",
                core0 * 100.0,
                core1 * 100.0,
                self.seconds
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// embedcar as a child process
// ---------------------------------------------------------------------------------------------

impl Embedcar {
    fn peak_mib(&self) -> f64 {
        status_mib(self.pid(), "VmHWM").unwrap_or(f64::NAN)
    }

    /// The sum of every series of one metric on the admin port's `/metrics`.
    async fn metric(&self, name: &str) -> Option<f64> {
        metric_at(self.admin?, name).await
    }
}

/// The sum of every series of each named metric on an admin port's `/metrics`, one scrape.
async fn metrics_at(admin: SocketAddr, names: &[&str]) -> Option<Vec<Option<f64>>> {
    let mut sender = connect(admin).await.ok()?;
    let req = Request::get("/metrics")
        .header(HOST, admin.to_string())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    let mut sums = vec![None; names.len()];
    for line in text.lines() {
        for (name, sum) in names.iter().zip(sums.iter_mut()) {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    Some(sums)
}

async fn metric_at(admin: SocketAddr, name: &str) -> Option<f64> {
    metrics_at(admin, &[name]).await?.pop().flatten()
}

// ---------------------------------------------------------------------------------------------
// HTTP client side
// ---------------------------------------------------------------------------------------------

type Sender = SendRequest<Full<Bytes>>;

async fn connect<B>(addr: SocketAddr) -> Result<SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The request body of one caller asking for one input, base64 like the official clients.
fn body_for(input: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "input": input,
            "model": MODEL,
            "encoding_format": "base64",
        }))
        .expect("JSON"),
    )
}

/// A 200 reply: its body and how many inputs embedcar answered from its cache.
struct Reply {
    body: Bytes,
    cache_hits: u64,
}

/// `Err((message, broken))`: `broken` means the connection is unusable.
async fn send(
    sender: &mut Sender,
    host: &HeaderValue,
    body: Bytes,
) -> Result<Reply, (String, bool)> {
    let req = Request::post(ROUTE)
        .header(HOST, host.clone())
        .header(AUTHORIZATION, AUTH)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("valid request");
    if let Err(e) = sender.ready().await {
        return Err((format!("connection closed: {e}"), true));
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| (format!("request failed: {e}"), true))?;
    let status = resp.status();
    let cache_hits = resp
        .headers()
        .get("x-embedcar-cache-hits")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| (format!("body failed: {e}"), true))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err((
            format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ),
            false,
        ));
    }
    Ok(Reply { body, cache_hits })
}

/// Whether a reply is the one-vector list the fake computes for `input` (exact float32).
fn check_reply(body: &[u8], input: &str, dims: usize) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("reply is not JSON: {e}"))?;
    let data = v["data"].as_array().ok_or("reply has no data")?;
    if data.len() != 1 || data[0]["index"] != 0 {
        return Err(format!("{} items in data", data.len()));
    }
    let got = fake_openai::decode_embedding(&data[0]["embedding"])
        .ok_or("embedding is not base64 float32")?;
    let want = fake_openai::expected_embedding(&EmbeddingInput::Text(input.to_string()), dims);
    if got != want {
        return Err(format!("wrong vector for {input:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fan-in: many callers, one input each, a slow upstream with few slots
// ---------------------------------------------------------------------------------------------

fn caller_input(i: usize) -> String {
    format!("caller {i}: the food was delicious and the waiter was friendly.")
}

struct FanIn {
    path: &'static str,
    callers: usize,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    wrong: usize,
    first_wrong: Option<String>,
    /// From the common start to the last caller's complete reply.
    completion: Duration,
    latency: Histogram<u64>,
    peak_upstream: usize,
    window: Window,
    embedcar_mib: Option<f64>,
}

impl FanIn {
    fn p_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e6
    }
}

type CallerOutcome = (usize, Duration, Result<Bytes, String>);

/// Collects the callers' outcomes (checked against the fake's vectors) into a [`FanIn`].
fn fan_in_result(
    path: &'static str,
    s: &Settings,
    outcomes: Vec<CallerOutcome>,
    window: Window,
    peak_upstream: usize,
    embedcar_mib: Option<f64>,
) -> FanIn {
    let mut r = FanIn {
        path,
        callers: s.callers,
        ok: 0,
        errors: s.callers.saturating_sub(outcomes.len()),
        first_error: (outcomes.len() < s.callers)
            .then(|| format!("{} callers got no answer", s.callers - outcomes.len())),
        wrong: 0,
        first_wrong: None,
        completion: Duration::ZERO,
        latency: histogram(HIST_MAX_NS),
        peak_upstream,
        window,
        embedcar_mib,
    };
    for (i, elapsed, outcome) in outcomes {
        r.completion = r.completion.max(elapsed);
        match outcome {
            Ok(body) => {
                r.ok += 1;
                r.latency.saturating_record(ns(elapsed));
                if let Err(e) = check_reply(&body, &caller_input(i), s.dims) {
                    r.wrong += 1;
                    r.first_wrong.get_or_insert(e);
                }
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e);
            }
        }
    }
    r
}

/// How long a fan-in run may take before it counts as hung: four times the direct run's
/// expected duration, plus 20 s.
fn fan_in_limit(s: &Settings) -> Duration {
    let rounds = s.callers.div_ceil(s.slots) as u32;
    s.delay * rounds * 4 + Duration::from_secs(20)
}

/// Waits for every caller task, or gives up at `limit` (aborting the rest).
async fn join_callers(
    tasks: Vec<tokio::task::JoinHandle<CallerOutcome>>,
    limit: Duration,
) -> Vec<CallerOutcome> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut outcomes = Vec::with_capacity(tasks.len());
    for mut t in tasks {
        match tokio::time::timeout_at(deadline, &mut t).await {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(e)) => eprintln!("caller task failed: {e}"),
            // Hung: counted as a caller without an answer.
            Err(_) => t.abort(),
        }
    }
    outcomes
}

/// DIRECT: every caller waits for one of `slots` pooled connections to the upstream, sends its
/// request on it and gives it back.
async fn fan_in_direct(s: &Settings, fake: &FakeUpstream) -> Result<FanIn, String> {
    let addr = fake.addr();
    let host = HeaderValue::from_str(&addr.to_string()).expect("host header");
    let mut conns = Vec::with_capacity(s.slots);
    for _ in 0..s.slots {
        conns.push(connect::<Full<Bytes>>(addr).await?);
    }
    let pool = Arc::new((Semaphore::new(s.slots), Mutex::new(conns)));
    fake.reset_stats();
    let a = Snapshot::take(None, fake, None);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(s.callers);
    for i in 0..s.callers {
        let pool = pool.clone();
        let host = host.clone();
        let body = body_for(&caller_input(i));
        tasks.push(tokio::spawn(async move {
            // Semaphore waiters are served in FIFO order: callers go in the order they asked.
            let _permit = pool.0.acquire().await.expect("semaphore open");
            let mut sender = pool.1.lock().unwrap().pop().expect("a pooled connection");
            let result = send(&mut sender, &host, body).await;
            if matches!(result, Err((_, true))) {
                match connect(addr).await {
                    Ok(fresh) => sender = fresh,
                    Err(e) => eprintln!("direct: reconnect failed: {e}"),
                }
            }
            pool.1.lock().unwrap().push(sender);
            (i, t0.elapsed(), result.map(|r| r.body).map_err(|e| e.0))
        }));
    }
    let outcomes = join_callers(tasks, fan_in_limit(s)).await;
    let b = Snapshot::take(None, fake, None);
    let peak = fake.peak_concurrency();
    // Close the pool: the fake holds a connection slot for each open connection.
    drop(pool);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(fan_in_result(
        "direct",
        s,
        outcomes,
        Window::between(&a, &b),
        peak,
        None,
    ))
}

/// One request for `input` through embedcar on a new connection, its vector checked: embedcar
/// works end to end before anything is measured.
async fn check_through(
    s: &Settings,
    addr: SocketAddr,
    host: &HeaderValue,
    input: &str,
) -> Result<(), String> {
    let mut sender = connect(addr).await?;
    let reply = send(&mut sender, host, body_for(input))
        .await
        .map_err(|e| format!("through embedcar: {}", e.0))?;
    check_reply(&reply.body, input, s.dims).map_err(|e| format!("through embedcar: {e}"))
}

/// EMBEDCAR: every caller on its own connection to embedcar, all sending at once. With
/// `sample`, the adaptive limit is read every few milliseconds during the run (for the chart).
async fn fan_in_through(
    s: &Settings,
    fake: &FakeUpstream,
    ec: &mut Embedcar,
    path: &'static str,
    sample: bool,
) -> Result<(FanIn, Vec<LimitSample>), String> {
    let host = HeaderValue::from_str(&ec.addr.to_string()).expect("host header");
    // One request first: embedcar works end to end (and has one pooled upstream connection,
    // as a running sidecar would). Its input is not one of the callers'.
    check_through(s, ec.addr, &host, "warm-up").await?;
    let mut senders = Vec::with_capacity(s.callers);
    for _ in 0..s.callers {
        senders.push(connect::<Full<Bytes>>(ec.addr).await?);
    }
    // Wait until embedcar has accepted them all, so that accepting is not part of the run.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ec.metric("embedcar_open_connections").await {
            Some(n) if n >= s.callers as f64 => break,
            Some(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Some(n) => {
                eprintln!(
                    "warning: embedcar has accepted only {n} of {} connections",
                    s.callers
                );
                break;
            }
            None => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                break;
            }
        }
    }
    let bodies: Vec<Bytes> = (0..s.callers).map(|i| body_for(&caller_input(i))).collect();
    fake.reset_stats();
    let a = Snapshot::take(Some(ec.pid()), fake, None);
    let t0 = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = match (sample, ec.admin) {
        (true, Some(admin)) => Some(tokio::spawn(sample_limit(admin, t0, stop.clone()))),
        _ => None,
    };
    let mut tasks = Vec::with_capacity(s.callers);
    for (i, (mut sender, body)) in senders.into_iter().zip(bodies).enumerate() {
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let result = send(&mut sender, &host, body).await;
            (i, t0.elapsed(), result.map(|r| r.body).map_err(|e| e.0))
        }));
    }
    let outcomes = join_callers(tasks, fan_in_limit(s)).await;
    let b = Snapshot::take(Some(ec.pid()), fake, None);
    stop.store(true, Ordering::Relaxed);
    let samples = match sampler {
        Some(t) => t.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let peak = fake.peak_concurrency();
    let result = fan_in_result(
        path,
        s,
        outcomes,
        Window::between(&a, &b),
        peak,
        Some(ec.peak_mib()),
    );
    Ok((result, samples))
}

/// One look at the adaptive limit during a fan-in.
#[derive(Clone, Copy, Debug)]
struct LimitSample {
    /// Seconds since the callers' common start.
    at: f64,
    limit: f64,
    upstream_in_flight: f64,
    baseline_ms: f64,
    /// Mean time to the upstream's reply head of the calls finished since the last look.
    latency_ms: Option<f64>,
}

/// Reads the limit, the calls in flight and the latencies every 5 ms until `stop`.
async fn sample_limit(
    admin: SocketAddr,
    t0: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<LimitSample> {
    const NAMES: [&str; 5] = [
        "embedcar_upstream_concurrency_limit",
        "embedcar_upstream_in_flight",
        "embedcar_upstream_latency_baseline_seconds",
        "embedcar_upstream_duration_seconds_sum",
        "embedcar_upstream_duration_seconds_count",
    ];
    let mut out = Vec::new();
    let mut last: Option<(f64, f64)> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Some(v) = metrics_at(admin, &NAMES).await {
            let (sum, count) = (v[3].unwrap_or(0.0), v[4].unwrap_or(0.0));
            let latency_ms = last
                .filter(|(_, c)| count > *c)
                .map(|(s0, c0)| (sum - s0) / (count - c0) * 1e3);
            last = Some((sum, count));
            out.push(LimitSample {
                at: t0.elapsed().as_secs_f64(),
                limit: v[0].unwrap_or(f64::NAN),
                upstream_in_flight: v[1].unwrap_or(0.0),
                baseline_ms: v[2].unwrap_or(0.0) * 1e3,
                latency_ms,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// Draws the limit and the upstream's latency over a run as an SVG.
fn write_chart(path: &str, samples: &[LimitSample], capacity: usize) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Debug| format!("chart: {e:?}");
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(260);
    let t_max = samples.last().map_or(1.0, |s| s.at).max(1e-3);
    let y_max = samples
        .iter()
        .map(|s| s.limit.max(s.upstream_in_flight))
        .fold(capacity as f64, f64::max)
        + 1.0;
    let mut c = ChartBuilder::on(&top)
        .caption(
            "embeddings calls in flight: the adaptive limit finds the upstream's capacity",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("seconds since the callers' common start")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        [(0.0, capacity as f64), (t_max, capacity as f64)],
        RGBColor(255, 140, 0).stroke_width(3),
    ))
    .map_err(|e| err(&e))?
    .label("upstream capacity (unknown to embedcar)")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(255, 140, 0)));
    c.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.at, s.limit)),
        BLUE.stroke_width(2),
    ))
    .map_err(|e| err(&e))?
    .label("adaptive limit")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.at, s.upstream_in_flight)),
        RED,
    ))
    .map_err(|e| err(&e))?
    .label("upstream calls in flight")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let l_max = samples
        .iter()
        .flat_map(|s| [s.baseline_ms, s.latency_ms.unwrap_or(0.0)])
        .fold(1.0, f64::max)
        * 1.2;
    let mut c = ChartBuilder::on(&bottom)
        .caption("upstream latency", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..t_max, 0.0..l_max)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .y_desc("ms")
        .x_desc("seconds since the callers' common start")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.at, s.baseline_ms)),
        GREEN.stroke_width(2),
    ))
    .map_err(|e| err(&e))?
    .label("baseline (an unqueued call of that size)")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
    c.draw_series(samples.iter().filter_map(|s| {
        s.latency_ms
            .map(|l| Circle::new((s.at, l), 3, MAGENTA.filled()))
    }))
    .map_err(|e| err(&e))?
    .label("calls finished since the last look (mean)")
    .legend(|(x, y)| Circle::new((x + 10, y), 3, MAGENTA.filled()));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// CPU per upstream call of the adaptive limit itself: a place taken and given back with a
/// judgement, in this process, on this thread (nothing here waits, so the task stays put).
async fn adaptive_cost_ns() -> f64 {
    use embedcar::adaptive_limit::{AdaptiveLimit, Signal};
    let limit = AdaptiveLimit::new(256, Arc::new(embedcar::metrics::Metrics::new()));
    const CALLS: u64 = 200_000;
    let start = thread_cpu_ns();
    for i in 0..CALLS {
        let place = limit.acquire().await;
        place.finish(Signal::Answered, 10 + (i % 4096));
    }
    (thread_cpu_ns() - start) as f64 / CALLS as f64
}

// ---------------------------------------------------------------------------------------------
// Saturation: a closed loop of single-input base64 requests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Inputs {
    /// Every request a new input: a cache miss, sent upstream. embedcar's defaults (256
    /// upstream slots), so an input rarely waits for a slot; a call carries the inputs of the
    /// requests embedcar read while its core was busy (the dispatcher lets runnable tasks go
    /// first), which at saturation is several.
    Distinct,
    /// The same with `EMBEDCAR_EMBEDDINGS__MAX_INPUTS_PER_CALL=1`: every miss pays for an
    /// upstream call of its own, the engine's worst case (reported beside the target, not as
    /// it: the figure is for embedcar's defaults).
    DistinctOnePerCall,
    /// The same with `EMBEDCAR_LIMITS__MAX_CONCURRENCY` = the fan-in's slots: inputs wait for a
    /// slot and leave together, so calls carry several inputs.
    DistinctFewSlots,
    /// Inputs drawn from a warmed set: every request a cache hit.
    Repeated,
}

impl Inputs {
    fn label(self) -> &'static str {
        match self {
            Inputs::Distinct => "misses",
            Inputs::DistinctOnePerCall => "misses, 1 input/call",
            Inputs::DistinctFewSlots => "misses, few slots",
            Inputs::Repeated => "hits",
        }
    }

    /// embedcar's environment for the run.
    fn env(self, s: &Settings) -> Vec<(&'static str, String)> {
        match self {
            Inputs::DistinctFewSlots => {
                vec![("EMBEDCAR_LIMITS__MAX_CONCURRENCY", s.slots.to_string())]
            }
            Inputs::DistinctOnePerCall => {
                vec![("EMBEDCAR_EMBEDDINGS__MAX_INPUTS_PER_CALL", "1".to_string())]
            }
            _ => Vec::new(),
        }
    }

    fn input(self, conn: usize, seq: u64, hot: usize) -> String {
        match self {
            Inputs::Distinct | Inputs::DistinctOnePerCall | Inputs::DistinctFewSlots => {
                format!(
                    "saturation {conn} {seq}: the food was delicious and the waiter was friendly."
                )
            }
            Inputs::Repeated => hot_input((conn + seq as usize * 7919) % hot),
        }
    }
}

fn hot_input(k: usize) -> String {
    format!("hot {k}: the food was delicious and the waiter was friendly.")
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    /// Inputs embedcar answered from its cache (`x-embedcar-cache-hits`).
    hits: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().unwrap().get_or_insert(what);
    }
}

struct Saturation {
    inputs: Inputs,
    throughput: f64,
    latency: Histogram<u64>,
    window: Window,
    errors: u64,
    total: u64,
    first_error: Option<String>,
    peak_mib: f64,
}

impl Saturation {
    fn p_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e6
    }

    fn per_request_us(&self, ns: Option<f64>) -> f64 {
        ns.map_or(f64::NAN, |ns| {
            ns / 1e3 / self.window.completed.max(1) as f64
        })
    }

    fn error_rate(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.errors as f64 / self.total as f64
        }
    }
}

/// One connection of the closed loop: send, read, repeat until the window ends.
async fn closed_conn(
    addr: SocketAddr,
    conn: usize,
    inputs: Inputs,
    hot: usize,
    counters: Arc<Counters>,
    window: (Instant, Instant),
) -> Histogram<u64> {
    let host = HeaderValue::from_str(&addr.to_string()).expect("host header");
    let mut latency = histogram(HIST_MAX_NS);
    let mut sender: Option<Sender> = None;
    let mut seq = 0u64;
    while Instant::now() < window.1 {
        if sender.is_none() {
            match connect(addr).await {
                Ok(c) => sender = Some(c),
                Err(e) => {
                    counters.error(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let body = body_for(&inputs.input(conn, seq, hot));
        seq += 1;
        let start = Instant::now();
        match send(sender.as_mut().expect("connected"), &host, body).await {
            Ok(reply) => {
                counters.completed.fetch_add(1, Ordering::Relaxed);
                counters.hits.fetch_add(reply.cache_hits, Ordering::Relaxed);
                if start >= window.0 && start < window.1 {
                    latency.saturating_record(ns(start.elapsed()));
                }
            }
            Err((e, broken)) => {
                counters.error(e);
                if broken {
                    sender = None;
                }
            }
        }
    }
    latency
}

async fn saturation(
    s: &Settings,
    fake: &FakeUpstream,
    inputs: Inputs,
    pinned: bool,
) -> Result<Saturation, String> {
    let mut ec = Embedcar::start(&fake.url(), pinned, EMBEDCAR_CORE, &inputs.env(s))?;
    let result = saturation_on(s, fake, inputs, &mut ec).await;
    let died = !ec.alive();
    ec.stop().await;
    if died {
        return Err(format!(
            "embedcar exited during the {} saturation run",
            inputs.label()
        ));
    }
    result
}

async fn saturation_on(
    s: &Settings,
    fake: &FakeUpstream,
    inputs: Inputs,
    ec: &mut Embedcar,
) -> Result<Saturation, String> {
    let host = HeaderValue::from_str(&ec.addr.to_string()).expect("host header");
    check_through(s, ec.addr, &host, "saturation check").await?;
    if inputs == Inputs::Repeated {
        // Warm the cache with every hot input, 64 at a time.
        for chunk in (0..s.hot_inputs).collect::<Vec<_>>().chunks(64) {
            let mut warm = Vec::new();
            for &k in chunk {
                let addr = ec.addr;
                let host = host.clone();
                warm.push(tokio::spawn(async move {
                    let mut sender = connect(addr).await?;
                    send(&mut sender, &host, body_for(&hot_input(k)))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.0)
                }));
            }
            for w in warm {
                w.await.map_err(|e| e.to_string())??;
            }
        }
    }
    let counters = Arc::new(Counters::default());
    let t0 = Instant::now() + Duration::from_millis(5);
    let window = (t0 + s.warmup, t0 + s.warmup + s.measure);
    tokio::time::sleep_until(t0.into()).await;
    let mut tasks = Vec::with_capacity(s.connections);
    for c in 0..s.connections {
        tasks.push(tokio::spawn(closed_conn(
            ec.addr,
            c,
            inputs,
            s.hot_inputs,
            counters.clone(),
            window,
        )));
    }
    tokio::time::sleep_until(window.0.into()).await;
    let a = Snapshot::take(Some(ec.pid()), fake, Some(&counters));
    tokio::time::sleep_until(window.1.into()).await;
    let b = Snapshot::take(Some(ec.pid()), fake, Some(&counters));
    let mut latency = histogram(HIST_MAX_NS);
    for t in tasks {
        let h = t.await.map_err(|e| format!("connection task: {e}"))?;
        latency.add(&h).expect("same bounds");
    }
    let window = Window::between(&a, &b);
    let errors = counters.errors.load(Ordering::Relaxed);
    let first_error = counters.first_error.lock().unwrap().take();
    Ok(Saturation {
        inputs,
        throughput: window.completed as f64 / window.seconds,
        latency,
        errors,
        total: counters.completed.load(Ordering::Relaxed) + errors,
        first_error,
        peak_mib: ec.peak_mib(),
        window,
    })
}

// ---------------------------------------------------------------------------------------------
// Render: µs per 1536-dimension vector
// ---------------------------------------------------------------------------------------------

/// `count` vectors of `dims` values in [-0.1, 0.1), from a fixed splitmix64 stream.
fn render_vectors(count: usize, dims: usize) -> Vec<Vec<f32>> {
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..count)
        .map(|_| {
            (0..dims)
                .map(|_| ((next() >> 40) as f64 / (1u64 << 24) as f64 * 0.2 - 0.1) as f32)
                .collect()
        })
        .collect()
}

struct RenderFigure {
    what: &'static str,
    median_us: f64,
    min_us: f64,
    bytes: usize,
    /// Thread CPU time / wall time over the measurement: below 1, the thread was preempted.
    on_cpu: f64,
}

/// Median and minimum over `rounds` of the mean time of `iters` calls of `f` on the vectors in
/// turn; `f` returns the bytes it wrote.
fn time_render(
    s: &Settings,
    what: &'static str,
    vectors: &[Vec<f32>],
    mut f: impl FnMut(&[f32]) -> usize,
) -> RenderFigure {
    // Warm-up: caches, branch predictors, the allocator's free lists.
    let mut bytes = 0;
    for v in vectors {
        bytes = f(v);
    }
    let mut per: Vec<f64> = Vec::with_capacity(s.render_rounds);
    let (wall0, cpu0) = (Instant::now(), thread_cpu_ns());
    for _ in 0..s.render_rounds {
        let start = Instant::now();
        for j in 0..s.render_iters {
            std::hint::black_box(f(std::hint::black_box(&vectors[j % vectors.len()])));
        }
        per.push(start.elapsed().as_secs_f64() * 1e6 / s.render_iters as f64);
    }
    let on_cpu = (thread_cpu_ns() - cpu0) as f64 / ns(wall0.elapsed()).max(1) as f64;
    per.sort_by(f64::total_cmp);
    RenderFigure {
        what,
        median_us: per[per.len() / 2],
        min_us: per[0],
        bytes,
        on_cpu,
    }
}

/// The render figures: `write_floats` first (the target's figure), base64, whole replies, and
/// zmij's `format_finite` per value into the same buffer, as `write_floats` wrote before
/// `float_text` (same bytes): the baseline the float figure is measured against, in this run.
fn render_bench(s: &Settings) -> Vec<RenderFigure> {
    let vectors = render_vectors(RENDER_VECTORS, s.dims);
    let mut out: Vec<u8> = Vec::with_capacity(s.dims * 16 + 256);
    let mut buf = zmij::Buffer::new();
    let mut figures = Vec::new();
    figures.push(time_render(
        s,
        "float JSON vector (write_floats)",
        &vectors,
        |v| {
            out.clear();
            write_floats(&mut out, v);
            out.len()
        },
    ));
    figures.push(time_render(
        s,
        "base64 vector (write_base64)",
        &vectors,
        |v| {
            out.clear();
            write_base64(&mut out, v);
            out.len()
        },
    ));
    figures.push(time_render(
        s,
        "float reply, 1 vector (render_reply)",
        &vectors,
        |v| render_reply(std::iter::once(v), Encoding::Float, MODEL, 13).len(),
    ));
    figures.push(time_render(
        s,
        "base64 reply, 1 vector (render_reply)",
        &vectors,
        |v| render_reply(std::iter::once(v), Encoding::Base64, MODEL, 13).len(),
    ));
    figures.push(time_render(
        s,
        "zmij format_finite (baseline)",
        &vectors,
        |v| {
            out.clear();
            out.push(b'[');
            for (i, f) in v.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if f.is_finite() {
                    out.extend_from_slice(buf.format_finite(*f).as_bytes());
                } else {
                    out.extend_from_slice(b"null");
                }
            }
            out.push(b']');
            out.len()
        },
    ));
    figures
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Rows of cells as aligned columns: the first `left` columns left-aligned, the rest right.
fn table(rows: &[Vec<String>], left: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c < left {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

fn fan_in_table(runs: &[FanIn]) -> String {
    let header = [
        "fan-in",
        "callers",
        "done s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "emb/s",
        "up calls",
        "up inputs",
        "callers/call",
        "peak up",
        "ec us/caller",
        "ec MiB",
        "bench%",
        "core0%",
        "core1%",
        "errors",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in runs {
        let w = &r.window;
        let core = |i: usize| w.cores_util.get(i).map_or("-".into(), |u| f1(u * 100.0));
        let mut errors = (r.errors + r.wrong).to_string();
        if r.errors + r.wrong > 0 {
            errors.push_str(" (!)");
        }
        rows.push(vec![
            r.path.into(),
            r.callers.to_string(),
            f3(r.completion.as_secs_f64()),
            f1(r.p_ms(0.5)),
            f1(r.p_ms(0.99)),
            f1(r.p_ms(1.0)),
            format!("{:.0}", r.ok as f64 / r.completion.as_secs_f64().max(1e-9)),
            w.upstream_calls.to_string(),
            w.upstream_inputs.to_string(),
            f1(r.callers as f64 / w.upstream_calls.max(1) as f64),
            r.peak_upstream.to_string(),
            w.proxy_ns
                .map_or("-".into(), |ns| f1(ns / 1e3 / r.callers.max(1) as f64)),
            r.embedcar_mib.map_or("-".into(), f1),
            f1(w.self_util * 100.0),
            if r.path.starts_with("direct") {
                "-".into()
            } else {
                core(EMBEDCAR_CORE)
            },
            core(BENCH_CORE),
            errors,
        ]);
    }
    table(&rows, 1)
}

fn saturation_table(runs: &[Saturation], connections: usize) -> String {
    let header = [
        "saturation",
        "conns",
        "req/s",
        "p50 ms",
        "p99 ms",
        "hits %",
        "up calls/s",
        "inputs/call",
        "ec us/req",
        "(stat)",
        "ec core%",
        "ec MiB",
        "bench%",
        "core0%",
        "core1%",
        "errors",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in runs {
        let w = &r.window;
        let core = |i: usize| w.cores_util.get(i).map_or("-".into(), |u| f1(u * 100.0));
        let mut errors = r.errors.to_string();
        if r.errors > 0 {
            errors.push_str(" (!)");
        }
        rows.push(vec![
            r.inputs.label().into(),
            connections.to_string(),
            format!("{:.0}", r.throughput),
            f3(r.p_ms(0.5)),
            f3(r.p_ms(0.99)),
            f1(w.hits as f64 * 100.0 / w.completed.max(1) as f64),
            format!("{:.0}", w.upstream_calls as f64 / w.seconds),
            if w.upstream_calls > 0 {
                f1(w.upstream_inputs as f64 / w.upstream_calls as f64)
            } else {
                "-".into()
            },
            f1(r.per_request_us(w.proxy_ns)),
            f1(r.per_request_us(w.proxy_stat_ns)),
            f1(w.proxy_util() * 100.0),
            f1(r.peak_mib),
            f1(w.self_util * 100.0),
            core(EMBEDCAR_CORE),
            core(BENCH_CORE),
            errors,
        ]);
    }
    table(&rows, 1)
}

fn render_table(figures: &[RenderFigure], dims: usize) -> String {
    let mut rows: Vec<Vec<String>> = vec![vec![
        format!("render ({dims} dimensions)"),
        "us median".into(),
        "us min".into(),
        "bytes".into(),
        "MB/s".into(),
    ]];
    for f in figures {
        rows.push(vec![
            f.what.into(),
            f3(f.median_us),
            f3(f.min_us),
            f.bytes.to_string(),
            format!("{:.0}", f.bytes as f64 / f.median_us),
        ]);
    }
    table(&rows, 1)
}

const LEGEND: &[&str] = &[
    "fan-in       every caller asks at the same instant; times run from that instant",
    "done s       until the last caller has its whole reply",
    "emb/s        callers answered / done s",
    "up calls     upstream embeddings calls (the fake's count); up inputs: inputs in them",
    "callers/call callers / upstream calls",
    "peak up      most upstream requests in flight at once (the fake's count)",
    "ec ...       embedcar (child process on core 0): us/caller, us/req = its CPU time",
    "             (user+system, all threads, process CPU clock) per caller or request;",
    "             (stat) the same from /proc/<pid>/stat; core% its CPU / wall time",
    "ec MiB       embedcar peak RSS (VmHWM; a fresh process per run)",
    "hits %       inputs embedcar answered from its cache (x-embedcar-cache-hits)",
    "inputs/call  upstream inputs per upstream call in the saturation window",
    "bench%       load generator + fake upstream CPU / wall time (core 1)",
    "core0/1%     whole-core busy time (/proc/stat), other load included",
];

/// The fan-in targets for one direct run and one run through embedcar.
fn pair_targets(fan: &[FanIn], direct: &str, through: &str, what: &str) -> Vec<String> {
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let mut lines = Vec::new();
    let direct = fan.iter().find(|r| r.path == direct);
    let through = fan.iter().find(|r| r.path == through);
    match through {
        Some(t) if t.ok == t.callers => {
            let ratio = t.callers as f64 / t.window.upstream_calls.max(1) as f64;
            lines.push(format!(
                "TARGET callers_per_upstream_call >= {TARGET_CALLERS_PER_CALL}{what}: {} callers / {} calls = {ratio:.1} {}",
                t.callers,
                t.window.upstream_calls,
                verdict(ratio >= TARGET_CALLERS_PER_CALL)
            ));
        }
        Some(_) => lines.push(format!(
            "TARGET callers_per_upstream_call >= {TARGET_CALLERS_PER_CALL}{what}: not measured (the embedcar fan-in run failed)"
        )),
        None => lines.push(format!(
            "TARGET callers_per_upstream_call >= {TARGET_CALLERS_PER_CALL}{what}: not run (BENCH_PARTS)"
        )),
    }
    match (direct, through) {
        (Some(d), Some(t)) if d.ok == d.callers && t.ok == t.callers => {
            let x = d.completion.as_secs_f64() / t.completion.as_secs_f64().max(1e-9);
            lines.push(format!(
                "TARGET completion_speedup >= {TARGET_SPEEDUP}{what}: direct {:.3} s / embedcar {:.3} s = {x:.1}x {}",
                d.completion.as_secs_f64(),
                t.completion.as_secs_f64(),
                verdict(x >= TARGET_SPEEDUP)
            ));
        }
        (None, _) | (_, None) => lines.push(format!(
            "TARGET completion_speedup >= {TARGET_SPEEDUP}{what}: not run (BENCH_PARTS)"
        )),
        _ => lines.push(format!(
            "TARGET completion_speedup >= {TARGET_SPEEDUP}{what}: not measured (a fan-in run failed)"
        )),
    }
    lines
}

fn targets(
    fan: &[FanIn],
    sat: &[Saturation],
    render: &[RenderFigure],
    adaptive_ns: Option<f64>,
) -> Vec<String> {
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let mut lines = Vec::new();
    match adaptive_ns {
        Some(ns) => lines.push(format!(
            "TARGET adaptive_limit_cpu_ns_per_call <= {TARGET_ADAPTIVE_NS}: {ns:.0} {}",
            verdict(ns <= TARGET_ADAPTIVE_NS)
        )),
        None => lines.push(format!(
            "TARGET adaptive_limit_cpu_ns_per_call <= {TARGET_ADAPTIVE_NS}: not run (BENCH_PARTS)"
        )),
    }
    lines.extend(pair_targets(fan, "direct", "embedcar", ""));
    lines.extend(pair_targets(
        fan,
        DIRECT_QUEUED,
        THROUGH_DEFAULTS,
        " (embedcar at its defaults, not told the capacity)",
    ));
    let cpu = |inputs: Inputs| {
        sat.iter()
            .find(|r| r.inputs == inputs)
            .map(|r| r.per_request_us(r.window.proxy_ns))
            .filter(|v| v.is_finite())
    };
    match cpu(Inputs::Distinct) {
        Some(us) => lines.push(format!(
            "TARGET engine_cpu_per_request_us <= {TARGET_CPU_US} (single-input base64, cache misses, closed loop): {us:.1} {}",
            verdict(us <= TARGET_CPU_US)
        )),
        None => lines.push(format!(
            "TARGET engine_cpu_per_request_us <= {TARGET_CPU_US}: not run (BENCH_PARTS)"
        )),
    }
    // Not the configuration, so no verdict: the cost when nothing is batched, read
    // against the same line.
    if let Some(us) = cpu(Inputs::DistinctOnePerCall) {
        lines.push(format!(
            "NOTE engine_cpu_per_request_us, worst case, one input per upstream call: {us:.1} ({:.0}% of the {TARGET_CPU_US} us line)",
            100.0 * us / TARGET_CPU_US
        ));
    }
    match render.first() {
        Some(f) => lines.push(format!(
            "TARGET render_float_us_per_vector <= {TARGET_FLOAT_US} (1536 dims, median): {:.2} {}",
            f.median_us,
            verdict(f.median_us <= TARGET_FLOAT_US)
        )),
        None => lines.push(format!(
            "TARGET render_float_us_per_vector <= {TARGET_FLOAT_US}: not run (BENCH_PARTS)"
        )),
    }
    for (inputs, what) in [
        (
            Inputs::DistinctFewSlots,
            "cache misses, few upstream slots (inputs batched)",
        ),
        (Inputs::Repeated, "cache hits (no upstream call)"),
    ] {
        if let Some(us) = cpu(inputs) {
            lines.push(format!("NOTE engine_cpu_per_request_us, {what}: {us:.1}"));
        }
    }
    if let Some(b) = render.get(1) {
        lines.push(format!(
            "NOTE render_base64_us_per_vector (1536 dims, median): {:.2}",
            b.median_us
        ));
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let s = Settings::from_env();
    let pin = s.pin;
    run_pinned("engine bench", pin, |pinned| bench(s, pinned))
}

async fn bench(s: Settings, pinned: bool) -> Result<ExitCode, String> {
    println!("embedcar embeddings engine benchmark");
    println!(
        "  fan-in: {} callers x 1 input, {MODEL}, base64, {} dimensions; upstream {} ms, {} connection slots; embedcar EMBEDCAR_LIMITS__MAX_CONCURRENCY={}{}",
        s.callers,
        s.dims,
        s.delay.as_millis(),
        s.slots,
        s.slots,
        if s.smoke { " (test mode: `--bench` not given, figures not meaningful)" } else { "" }
    );
    println!(
        "  saturation: {} connections, closed loop, upstream at once, embedcar defaults; warm-up {:.1} s + {:.1} s measured per run; {} hot inputs",
        s.connections,
        s.warmup.as_secs_f64(),
        s.measure.as_secs_f64(),
        s.hot_inputs
    );
    println!(
        "  bench process (load generator + fake upstream + render loop): pid {}, cpus {}",
        std::process::id(),
        status_field("self", "Cpus_allowed_list").unwrap_or_default()
    );
    let config: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("EMBEDCAR_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !config.is_empty() {
        println!("  embedcar environment: {}", config.join(" "));
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("  load average before the run: {}", l.trim());
    }
    let mut warnings = Vec::new();

    // Render first, while nothing else runs in this process.
    let render = if s.runs("render") {
        render_bench(&s)
    } else {
        Vec::new()
    };
    for f in &render {
        if f.median_us > f.min_us * MAX_RENDER_SPREAD || f.on_cpu < 0.95 {
            warnings.push(format!(
                "warning: render {}: median {:.2} us vs min {:.2} us, on CPU {:.0}% of the time: disturbed",
                f.what,
                f.median_us,
                f.min_us,
                f.on_cpu * 100.0
            ));
        }
    }

    // Fan-in: the same fake for both paths.
    let fake = FakeUpstream::start_with(FakeOptions {
        dims: s.dims,
        max_connections: Some(s.slots),
        record_requests: false,
        ..FakeOptions::default()
    })
    .await;
    fake.set_behavior(Behavior::Delay(s.delay));
    let mut fan = Vec::new();
    let mut embedcar_cpus = String::new();
    if s.runs("fanin") {
        let direct = fan_in_direct(&s, &fake).await?;
        fan.push(direct);
        let mut ec = Embedcar::start(
            &fake.url(),
            pinned,
            EMBEDCAR_CORE,
            &[("EMBEDCAR_LIMITS__MAX_CONCURRENCY", s.slots.to_string())],
        )?;
        embedcar_cpus = ec.cpus.clone();
        let through = fan_in_through(&s, &fake, &mut ec, "embedcar", false).await;
        let died = !ec.alive();
        ec.stop().await;
        if died {
            return Err("embedcar exited during the fan-in run".into());
        }
        fan.push(through?.0);
    }
    drop(fake);

    // The same fan-in against an upstream that works on `slots` calls at once and queues the
    // rest (a model server's workers, not a connection cap), embedcar at its defaults: it is
    // not told the capacity. The limit is charted over the run.
    let mut chart = None;
    if s.runs("fanin-defaults") {
        let fake = FakeUpstream::start_with(FakeOptions {
            dims: s.dims,
            capacity: Some(s.slots),
            record_requests: false,
            ..FakeOptions::default()
        })
        .await;
        fake.set_behavior(Behavior::Delay(s.delay));
        let mut direct = fan_in_direct(&s, &fake).await?;
        direct.path = DIRECT_QUEUED;
        fan.push(direct);
        let mut ec = Embedcar::start(&fake.url(), pinned, EMBEDCAR_CORE, &[])?;
        let through = fan_in_through(&s, &fake, &mut ec, THROUGH_DEFAULTS, true).await;
        let died = !ec.alive();
        ec.stop().await;
        if died {
            return Err("embedcar exited during the defaults fan-in run".into());
        }
        let (run, samples) = through?;
        fan.push(run);
        let path = std::env::var("BENCH_CHART")
            .unwrap_or_else(|_| "target/bench-adaptive-limit.svg".into());
        match write_chart(&path, &samples, s.slots) {
            Ok(()) => chart = Some(path),
            Err(e) => warnings.push(format!("warning: {e}")),
        }
    }
    let adaptive_ns = if s.runs("adaptive") {
        Some(adaptive_cost_ns().await)
    } else {
        None
    };

    // Saturation: an upstream that answers at once, no connection cap.
    // The fake bills with a word count here, not tiktoken: it shares a core with the load
    // generator, and embedcar counts OpenAI models' tokens itself.
    let fake = FakeUpstream::start_with(FakeOptions {
        dims: s.dims,
        record_requests: false,
        exact_usage: false,
        ..FakeOptions::default()
    })
    .await;
    let mut sat = Vec::new();
    for (inputs, part) in [
        (Inputs::Distinct, "misses"),
        (Inputs::DistinctOnePerCall, "one-per-call"),
        (Inputs::DistinctFewSlots, "few-slots"),
        (Inputs::Repeated, "hits"),
    ] {
        if s.runs(part) {
            sat.push(saturation(&s, &fake, inputs, pinned).await?);
        }
    }
    let shared = if s.runs("redis") {
        shared_tier_bench(&s, &fake, pinned).await?
    } else {
        None
    };
    drop(fake);

    println!(
        "  embedcar: {} (fresh process per run), cpus {embedcar_cpus}; pinned: {}",
        embedcar_bin(),
        if pinned {
            format!("embedcar core {EMBEDCAR_CORE}, bench core {BENCH_CORE}")
        } else {
            "no".into()
        }
    );
    println!();
    print!("{}", fan_in_table(&fan));
    println!();
    print!("{}", saturation_table(&sat, s.connections));
    println!();
    print!("{}", render_table(&render, s.dims));
    println!();
    if let Some(f) = &shared {
        print!("{}", shared_tier_table(f));
        println!();
    }
    for l in LEGEND {
        println!("  {l}");
    }
    for r in &fan {
        if let Some(w) = r.window.disturbance(&format!("fan-in {}", r.path), pinned) {
            warnings.push(w);
        }
    }
    for r in &sat {
        if let Some(w) = r
            .window
            .disturbance(&format!("saturation {}", r.inputs.label()), pinned)
        {
            warnings.push(w);
        }
    }
    for w in &warnings {
        println!("{w}");
    }
    println!();
    if !s.smoke {
        for line in targets(&fan, &sat, &render, adaptive_ns) {
            println!("{line}");
        }
        if let Some(path) = &chart {
            println!("NOTE the adaptive limit over the defaults fan-in is charted in {path}");
        }
    }

    let mut broken = false;
    for r in &fan {
        if r.errors > 0 {
            eprintln!(
                "fan-in {}: {} of {} callers failed, first: {}",
                r.path,
                r.errors,
                r.callers,
                r.first_error.as_deref().unwrap_or("?")
            );
        }
        if r.wrong > 0 {
            eprintln!(
                "fan-in {}: {} replies carried a wrong vector, first: {}",
                r.path,
                r.wrong,
                r.first_wrong.as_deref().unwrap_or("?")
            );
            broken = true;
        }
        if r.errors as f64 > r.callers as f64 * MAX_ERROR_RATE {
            broken = true;
        }
    }
    for r in &sat {
        if r.errors > 0 {
            eprintln!(
                "saturation {}: {} of {} requests failed ({:.2}%), first: {}",
                r.inputs.label(),
                r.errors,
                r.total,
                r.error_rate() * 100.0,
                r.first_error.as_deref().unwrap_or("?")
            );
        }
        if r.error_rate() > MAX_ERROR_RATE {
            broken = true;
        }
    }
    Ok(if broken {
        eprintln!("the measurement is not valid (errors or wrong vectors above)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

// ---------------------------------------------------------------------------------------------
// The shared tier (Redis): L2 hits against L1 hits, round trips per call, the gate's latency
// ---------------------------------------------------------------------------------------------

/// What the shared tier costs, measured on the real binary against a real redis-server.
struct SharedTierFigures {
    inputs: usize,
    l1_hit_us: f64,
    l2_hit_us: f64,
    fetch_per_call: f64,
    gate_per_call: f64,
    store_per_call: f64,
    gate_p50_us: f64,
    gate_p99_us: f64,
}

/// A redis-server of the benchmark's own on a free port (no persistence), stopped on drop.
struct BenchRedis {
    child: std::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_bench_redis() -> Result<BenchRedis, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = std::env::temp_dir().join(format!("embedcar-bench-redis-{port}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("no redis-server ({e})"))?;
    let r = BenchRedis {
        child,
        dir,
        url: format!("redis://127.0.0.1:{port}/0"),
    };
    for _ in 0..200 {
        if let Ok(mut c) = redis::Client::open(r.url.as_str()).and_then(|c| c.get_connection()) {
            if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                return Ok(r);
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err("redis-server did not come up".into())
}

/// Sends each of `inputs` once through `addr`, `conns` at a time; answers the cache hits.
async fn each_once(addr: SocketAddr, inputs: &[String], conns: usize) -> Result<u64, String> {
    let host = HeaderValue::from_str(&addr.to_string()).expect("host header");
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (next, host) = (next.clone(), host.clone());
        let inputs: Arc<[String]> = inputs.into();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect::<Full<Bytes>>(addr).await?;
            let mut hits = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(input) = inputs.get(i) else {
                    return Ok::<u64, String>(hits);
                };
                hits += send(&mut sender, &host, body_for(input))
                    .await
                    .map_err(|(e, _)| e)?
                    .cache_hits;
            }
        }));
    }
    let mut hits = 0;
    for t in tasks {
        hits += t.await.map_err(|e| e.to_string())??;
    }
    Ok(hits)
}

async fn shared_tier_bench(
    s: &Settings,
    fake: &FakeUpstream,
    pinned: bool,
) -> Result<Option<SharedTierFigures>, String> {
    let redis = match start_bench_redis() {
        Ok(r) => r,
        Err(e) => {
            println!(
                "  shared tier (redis): SKIPPED, {e}; install Debian's redis-server to measure it"
            );
            return Ok(None);
        }
    };
    let env = vec![
        ("EMBEDCAR_REDIS__URL", redis.url.clone()),
        (
            "EMBEDCAR_LIMITS__REQUESTS_PER_MINUTE",
            "10000000".to_string(),
        ),
        // The cost of the tier, not its resilience: on a busy benchmark machine the default
        // 50 ms can expire and send requests to the fallback, which would not be an L2 hit.
        ("EMBEDCAR_REDIS__COMMAND_TIMEOUT", "1s".to_string()),
    ];
    let writer = Embedcar::start(&fake.url(), false, EMBEDCAR_CORE, &env)?;
    let mut reader = Embedcar::start(&fake.url(), pinned, EMBEDCAR_CORE, &env)?;
    let n = if s.smoke { 64 } else { 4000 };
    let inputs: Vec<String> = (0..n)
        .map(|i| format!("shared {i}: the food was delicious and the waiter was friendly."))
        .collect();
    // Through the writer: every input goes upstream once and on to Redis.
    each_once(writer.addr, &inputs, 8).await?;
    let mut conn = redis::Client::open(redis.url.as_str())
        .and_then(|c| c.get_connection())
        .map_err(|e| e.to_string())?;
    for _ in 0..500 {
        if redis::cmd("DBSIZE").query::<usize>(&mut conn).unwrap_or(0) > n {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Through the reader: first from Redis (L1 misses), then from its own L1, same run.
    let cpu = || cpu_ns(reader.pid()).map(|c| c as f64);
    let t0 = cpu().ok_or("no CPU clock")?;
    let l2_hits = each_once(reader.addr, &inputs, 8).await?;
    let t1 = cpu().ok_or("no CPU clock")?;
    let l1_hits = each_once(reader.addr, &inputs, 8).await?;
    let t2 = cpu().ok_or("no CPU clock")?;
    if l2_hits != n as u64 || l1_hits != n as u64 {
        return Err(format!(
            "shared tier: {l2_hits} and {l1_hits} hits of {n} (Redis did not answer every L1 miss)"
        ));
    }
    // Round trips per upstream call: misses one at a time, so that each is a call of its own.
    let names = [
        "embedcar_redis_command_seconds_count{op=\"fetch\"}",
        "embedcar_redis_command_seconds_count{op=\"gate\"}",
        "embedcar_redis_command_seconds_count{op=\"store\"}",
    ];
    let admin = reader.admin.ok_or("no admin address")?;
    let before = metrics_at(admin, &names).await.ok_or("no metrics")?;
    let calls_before = fake.embedding_calls();
    let misses: Vec<String> = (0..200)
        .map(|i| format!("shared miss {i}: the food was delicious and the waiter was friendly."))
        .collect();
    each_once(reader.addr, &misses, 1).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = metrics_at(admin, &names).await.ok_or("no metrics")?;
    let calls = (fake.embedding_calls() - calls_before).max(1) as f64;
    let per_call = |i: usize| (after[i].unwrap_or(0.0) - before[i].unwrap_or(0.0)) / calls;
    let (fetch, gate, store) = (per_call(0), per_call(1), per_call(2));
    reader.alive();
    writer.stop().await;
    reader.stop().await;

    // The gate check's own latency: the library's client against the same Redis, in turn.
    let metrics = Arc::new(embedcar::metrics::Metrics::new());
    let config = embedcar::config::RedisConfig {
        url: Some(redis.url.clone()),
        command_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let tier = embedcar::shared_tier::SharedTier::new(&config, true, metrics)
        .map_err(|e| e.to_string())?
        .ok_or("no tier")?;
    let limits = embedcar::shared_tier::GateLimits::per_minute(10_000_000, 0);
    let mut latency = histogram(HIST_MAX_NS);
    for i in 0..if s.smoke { 100 } else { 5000 } {
        let credential = [(i % 7) as u8; 32];
        let t = Instant::now();
        tier.gate(&credential, limits, 10)
            .await
            .ok_or("the gate did not answer")?;
        latency.record(ns(t.elapsed())).ok();
    }
    Ok(Some(SharedTierFigures {
        inputs: n,
        l2_hit_us: (t1 - t0) / 1e3 / n as f64,
        l1_hit_us: (t2 - t1) / 1e3 / n as f64,
        fetch_per_call: fetch,
        gate_per_call: gate,
        store_per_call: store,
        gate_p50_us: latency.value_at_quantile(0.5) as f64 / 1e3,
        gate_p99_us: latency.value_at_quantile(0.99) as f64 / 1e3,
    }))
}

fn shared_tier_table(f: &SharedTierFigures) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shared tier (redis), {} single-input base64 requests per phase, 8 connections:",
        f.inputs
    );
    let _ = writeln!(
        out,
        "  embedcar CPU per request, L1 hit:                      {:.1} us",
        f.l1_hit_us
    );
    let _ = writeln!(
        out,
        "  embedcar CPU per request, L2 hit (L1 miss, Redis hit): {:.1} us ({:+.1} us)",
        f.l2_hit_us,
        f.l2_hit_us - f.l1_hit_us
    );
    let _ = writeln!(
        out,
        "  Redis round trips per upstream call: {:.2} on the caller's path (fetch {:.2} + gate {:.2}), {:.2} written behind",
        f.fetch_per_call + f.gate_per_call,
        f.fetch_per_call,
        f.gate_per_call,
        f.store_per_call
    );
    let _ = writeln!(
        out,
        "  gate check (EVALSHA round trip) added latency: p50 {:.0} us, p99 {:.0} us",
        f.gate_p50_us, f.gate_p99_us
    );
    out
}
