//! Several embedcar replicas sharing one Redis (issue #11): one budget for all of them, the
//! upstream's 429 seen by one holding all, one cache, tenants kept apart, and Redis trouble
//! (stopped, slow) costing nothing but the sharing.
//!
//! Needs a real `redis-server`: `TEST_REDIS_URL` names the instance `scripts/test`
//! starts, and the outage scenarios start private ones (they stop and stall them) from
//! `redis-server` on the PATH. Without them a test fails under `CI=true` and is skipped, loudly,
//! elsewhere.

mod support;

use std::{
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use embedcar::{
    shared_tier::{GateAnswer, GateLimits, SharedTier},
    Config,
};
use fake_openai::{Behavior, FakeUpstream, Rule};
use http::{Request, StatusCode};
use serde_json::{json, Value};
use support::harness::{
    admin_text, body_json, client, config_for, metric_value, send, start_proxy, wait_ready,
    TestClient,
};

const MODEL: &str = "text-embedding-3-small";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The shared test instance, or `None` (skip) outside CI.
fn redis_url() -> Option<String> {
    match std::env::var("TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !in_ci(),
                "TEST_REDIS_URL is not set: CI must run these tests against a real redis-server (scripts/test starts one)"
            );
            eprintln!(
                "\n*** SKIPPED: TEST_REDIS_URL is not set; run scripts/test, or start redis-server and set it ***\n"
            );
            None
        }
    }
}

/// A key prefix of a test's own, so that tests sharing the instance never see each other's
/// buckets or vectors.
fn fresh_prefix(test: &str) -> String {
    format!("embedcar-test:{test}:{}:", uuid::Uuid::new_v4())
}

/// A redis-server of a test's own, which the test may stop, restart and stall.
struct PrivateRedis {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    /// `None` (skip) outside CI when there is no `redis-server`.
    fn start() -> Option<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir =
            std::env::temp_dir().join(format!("embedcar-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let child = Self::spawn(port, &dir)?;
        let r = PrivateRedis { child, port, dir };
        r.wait_up();
        Some(r)
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Option<Child> {
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "yes",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(c) => Some(c),
            Err(e) => {
                assert!(
                    !in_ci(),
                    "cannot start redis-server ({e}): CI must run these tests against a real one"
                );
                eprintln!("\n*** SKIPPED: cannot start redis-server ({e}) ***\n");
                None
            }
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn wait_up(&self) {
        for _ in 0..200 {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, &self.dir).expect("redis-server restarts");
        self.wait_up();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replica_config(upstream: &FakeUpstream, redis_url: &str, prefix: &str) -> Config {
    let mut c = config_for(&upstream.url());
    c.redis.url = Some(redis_url.to_string());
    c.redis.key_prefix = prefix.to_string();
    // Generous for a loaded CI machine; the breaker bounds what it may cost.
    c.redis.command_timeout = Duration::from_millis(100);
    c.retry.max_attempts = 1;
    c
}

async fn replicas(configs: Vec<Config>) -> Vec<embedcar::Handle> {
    let mut out = Vec::new();
    for c in configs {
        let h = start_proxy(c).await;
        wait_ready(&h).await;
        out.push(h);
    }
    out
}

fn embed_request(base: &str, key: &str, body: &Value) -> Request<embedcar::body::ProxyBody> {
    Request::post(format!("{base}/v1/embeddings"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(embedcar::body::full(body.to_string()))
        .unwrap()
}

/// Sends `count` requests (each its own `user`, so that none is merged into another's call,
/// and its own input, so that none is a cache hit) through `base`, `concurrency` at a time;
/// answers how many succeeded.
async fn load(client: &TestClient, base: &str, key: &str, tag: &str, count: usize) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (client, base, key, tag) = (
                client.clone(),
                base.to_string(),
                key.to_string(),
                tag.to_string(),
            );
            let (next, ok) = (next.clone(), ok.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let body = json!({
                        "model": MODEL,
                        "input": format!("{tag} input number {i} of the shared load, ten tokens"),
                        "user": format!("{tag}-{i}"),
                    });
                    let r = send(&client, embed_request(&base, &key, &body)).await;
                    if r.status() == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = support::harness::body_bytes(r).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    ok.load(Ordering::Relaxed)
}

/// One replica's throughput under a limit, then three replicas' under the same limit and the
/// same load: with the global gate the three together get what one got (not three times).
async fn three_replicas_share_one_limit(requests_per_minute: u32, tokens_per_minute: u32) {
    let Some(url) = redis_url() else { return };
    let upstream = FakeUpstream::start().await;
    let prefix = fresh_prefix("limit");
    let configs = (0..3)
        .map(|_| {
            let mut c = replica_config(&upstream, &url, &prefix);
            c.limits.requests_per_minute = requests_per_minute;
            c.limits.tokens_per_minute = tokens_per_minute;
            // Who cannot pass within a second is refused at once: the load is over quickly.
            c.limits.request_timeout = Duration::from_secs(1);
            c
        })
        .collect();
    let handles = replicas(configs).await;
    let client = client();
    let load_size = 240;

    // One replica alone, credential A.
    upstream.reset_stats();
    load(&client, &handles[0].url(), "sk-one", "one", load_size).await;
    let one = upstream.embedding_inputs();

    // The same load spread over three replicas, credential B (a budget of its own).
    upstream.reset_stats();
    let per = load_size / 3;
    let urls: Vec<String> = handles.iter().map(|h| h.url()).collect();
    let (a, b, c) = tokio::join!(
        load(&client, &urls[0], "sk-three", "three-a", per),
        load(&client, &urls[1], "sk-three", "three-b", per),
        load(&client, &urls[2], "sk-three", "three-c", per),
    );
    let three = upstream.embedding_inputs();
    eprintln!(
        "rpm {requests_per_minute} tpm {tokens_per_minute}: one replica let {one} through, three replicas {three} ({a}+{b}+{c} answered)"
    );
    assert!(one > 0, "the limit let nothing through");
    assert!(
        one < load_size,
        "the limit did not bind for one replica ({one} of {load_size})"
    );
    // 1.15x what one replica let through, plus a small burst allowance for the time the
    // three loads take beyond the one.
    let bound = (one as f64 * 1.15).ceil() as usize + 5;
    assert!(
        three <= bound,
        "three replicas sent {three}, one sent {one}: the budget was not shared (bound {bound})"
    );
    // A call may reach the upstream after its caller's deadline: it counts, unanswered.
    assert!(a + b + c <= three);
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_requests_per_minute_limit() {
    // A burst of 60, then one a second.
    three_replicas_share_one_limit(60, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_tokens_per_minute_limit() {
    // Each input is about 15 tokens: a burst of about 40 inputs.
    three_replicas_share_one_limit(0, 600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_seen_by_one_replica_holds_the_others_until_the_reset() {
    let Some(url) = redis_url() else { return };
    let upstream = FakeUpstream::start().await;
    let prefix = fresh_prefix("closure");
    let mut configs: Vec<Config> = (0..3)
        .map(|_| replica_config(&upstream, &url, &prefix))
        .collect();
    // C's callers will not wait 3 s.
    configs[2].limits.request_timeout = Duration::from_secs(1);
    let handles = replicas(configs).await;
    let client = client();
    let body = |n: u32| json!({"model": MODEL, "input": format!("closure {n}")});

    upstream.push_rule(Rule::once(
        Behavior::openai_error(429).with_header("retry-after", "3"),
    ));
    // A's call meets the 429 (A itself retries after the reset, within its deadline).
    let a = tokio::spawn({
        let (client, url) = (client.clone(), handles[0].url());
        async move {
            send(&client, embed_request(&url, "sk-c", &body(0)))
                .await
                .status()
        }
    });
    assert!(
        upstream
            .wait_until(Duration::from_secs(5), |u| u.request_count() >= 1)
            .await
    );
    let closed_at = Instant::now();
    // The closure is published behind the 429.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // C, whose callers cannot wait that long, is refused at once without a call.
    let r = send(&client, embed_request(&handles[2].url(), "sk-c", &body(2))).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "C is held");
    assert!(closed_at.elapsed() < Duration::from_millis(2500));
    assert_eq!(upstream.request_count(), 1, "C sent nothing");

    // B waits for the reset, then goes.
    let r = send(&client, embed_request(&handles[1].url(), "sk-c", &body(1))).await;
    let waited = closed_at.elapsed();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        waited >= Duration::from_millis(2700),
        "B went after {waited:?}, before the reset"
    );
    assert_eq!(
        a.await.unwrap(),
        StatusCode::OK,
        "A went after the reset too"
    );
    // The 429, then A's retry and B's call (perhaps merged into one).
    assert!((2..=3).contains(&upstream.request_count()));

    // Another credential was never held.
    let t = Instant::now();
    let r = send(
        &client,
        embed_request(&handles[1].url(), "sk-other", &body(3)),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(t.elapsed() < Duration::from_secs(1));
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

fn hits(r: &http::Response<hyper::body::Incoming>) -> u64 {
    r.headers()
        .get("x-embedcar-cache-hits")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until Redis holds `n` vectors under `prefix` (they are written behind the reply).
async fn wait_for_vectors(url: &str, prefix: &str, n: usize) {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..100 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}v:*"))
            .query_async(&mut c)
            .await
            .unwrap();
        if keys.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} vectors reached redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_input_embedded_through_one_replica_is_answered_by_another_from_redis() {
    let Some(url) = redis_url() else { return };
    let upstream = FakeUpstream::start().await;
    let prefix = fresh_prefix("l2");
    let handles = replicas(vec![
        replica_config(&upstream, &url, &prefix),
        replica_config(&upstream, &url, &prefix),
    ])
    .await;
    let client = client();
    let one = json!({"model": MODEL, "input": "a shared chunk", "encoding_format": "float"});

    let r = send(&client, embed_request(&handles[0].url(), "sk-a", &one)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let through_a = body_json(r).await;
    assert_eq!(upstream.embedding_inputs(), 1);
    wait_for_vectors(&url, &prefix, 1).await;

    // B has never seen it: Redis answers, the upstream does not hear of it.
    let r = send(&client, embed_request(&handles[1].url(), "sk-a", &one)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(hits(&r), 1);
    let through_b = body_json(r).await;
    assert_eq!(upstream.embedding_inputs(), 1, "no upstream input for B");
    assert_eq!(through_a["data"], through_b["data"], "the same vector");
    assert_eq!(through_a["usage"], through_b["usage"], "the same usage");
    assert_eq!(through_a["model"], through_b["model"]);

    // A partial hit: only the new input goes upstream.
    let two = json!({"model": MODEL, "input": ["a shared chunk", "a new chunk"]});
    let r = send(&client, embed_request(&handles[1].url(), "sk-a", &two)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(hits(&r), 1);
    assert_eq!(upstream.embedding_inputs(), 2);

    // Another tenant never gets A's entry.
    let r = send(&client, embed_request(&handles[1].url(), "sk-b", &one)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(hits(&r), 0, "tenants do not share L2 entries");
    assert_eq!(upstream.embedding_inputs(), 3);

    // The L2 metrics say so.
    let (_, metrics) = admin_text(&handles[1], "/metrics").await;
    assert!(metric_value(&metrics, "embedcar_redis_cache_hits_total").unwrap_or(0.0) >= 1.0);
    for h in handles {
        h.shutdown().await.unwrap();
    }

    // Unless the operator lets them share.
    let prefix = fresh_prefix("l2-shared");
    let mut configs = vec![
        replica_config(&upstream, &url, &prefix),
        replica_config(&upstream, &url, &prefix),
    ];
    for c in &mut configs {
        c.cache.share_across_credentials = true;
    }
    let handles = replicas(configs).await;
    upstream.reset_stats();
    let r = send(&client, embed_request(&handles[0].url(), "sk-a", &one)).await;
    assert_eq!(r.status(), StatusCode::OK);
    wait_for_vectors(&url, &prefix, 1).await;
    let r = send(&client, embed_request(&handles[1].url(), "sk-b", &one)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(hits(&r), 1, "shared across credentials when told to");
    assert_eq!(upstream.embedding_inputs(), 1);
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

/// Two replicas sharing `url` under a steady load for 5 s from now, with limits the load never
/// reaches (the gate is asked on every call); the load's observations come from the task.
async fn two_replicas_under_load(
    upstream: &FakeUpstream,
    url: &str,
    prefix: &str,
    tag: &'static str,
) -> (Vec<embedcar::Handle>, tokio::task::JoinHandle<Observed>) {
    let mut configs = vec![
        replica_config(upstream, url, prefix),
        replica_config(upstream, url, prefix),
    ];
    for c in &mut configs {
        c.limits.requests_per_minute = 100_000;
        c.limits.tokens_per_minute = 10_000_000;
    }
    let handles = replicas(configs).await;
    let bases: Vec<String> = handles.iter().map(|h| h.url()).collect();
    let client = client();
    let until = Instant::now() + Duration::from_secs(5);
    let load = tokio::spawn(async move { steady_load(&client, &bases, until, tag).await });
    (handles, load)
}

/// Latencies of a steady load through two replicas (a mix of repeated and new inputs) while
/// `trouble` happens to Redis; every request must be answered.
struct Observed {
    latencies: Vec<(Instant, Duration)>,
    failures: usize,
}

async fn steady_load(
    client: &TestClient,
    bases: &[String],
    until: Instant,
    tag: &'static str,
) -> Observed {
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let client = client.clone();
            let base = bases[w % bases.len()].clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut failures = 0;
                let mut i = 0u64;
                while Instant::now() < until {
                    i += 1;
                    // Half repeated (cache hits, L1 or L2), half new.
                    let input = if i % 2 == 0 {
                        format!("{tag} repeated {}", i % 16)
                    } else {
                        format!("{tag} new {w} {i}")
                    };
                    let body = json!({"model": MODEL, "input": input});
                    let t = Instant::now();
                    let r = send(&client, embed_request(&base, "sk-steady", &body)).await;
                    let ok = r.status() == StatusCode::OK;
                    let _ = support::harness::body_bytes(r).await;
                    if ok {
                        seen.push((t, t.elapsed()));
                    } else {
                        failures += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (seen, failures)
            })
        })
        .collect();
    let mut observed = Observed {
        latencies: Vec::new(),
        failures: 0,
    };
    for w in workers {
        let (seen, failures) = w.await.unwrap();
        observed.latencies.extend(seen);
        observed.failures += failures;
    }
    observed
}

async fn metric(h: &embedcar::Handle, series: &str) -> f64 {
    let (_, m) = admin_text(h, "/metrics").await;
    metric_value(&m, series).unwrap_or(0.0)
}

/// Vectors Redis holds under `prefix`; 0 while it cannot be asked.
async fn vectors(url: &str, prefix: &str) -> usize {
    let Ok(client) = redis::Client::open(url) else {
        return 0;
    };
    let Ok(Ok(mut c)) = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return 0;
    };
    redis::cmd("KEYS")
        .arg(format!("{prefix}v:*"))
        .query_async::<Vec<String>>(&mut c)
        .await
        .map_or(0, |k| k.len())
}

/// After trouble: the tier left its fallback by itself, and an input embedded through one
/// replica is answered by the other from Redis again.
async fn sharing_resumes(handles: &[embedcar::Handle], url: &str, prefix: &str) {
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(20);
    let client = client();
    for n in 0.. {
        assert!(
            Instant::now() < deadline,
            "sharing did not resume within 20 s"
        );
        let body = json!({"model": MODEL, "input": format!("after the trouble {n}")});
        let before = vectors(url, prefix).await;
        let r = send(
            &client,
            embed_request(&handles[0].url(), "sk-steady", &body),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        let mut stored = false;
        for _ in 0..25 {
            if vectors(url, prefix).await > before {
                stored = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if stored {
            let r = send(
                &client,
                embed_request(&handles[1].url(), "sk-steady", &body),
            )
            .await;
            assert_eq!(r.status(), StatusCode::OK);
            if hits(&r) == 1 {
                for h in handles {
                    assert_eq!(metric(h, "embedcar_redis_fallback").await, 0.0);
                }
                eprintln!(
                    "sharing resumed {:?} after the trouble ended",
                    resumed.elapsed()
                );
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_load_costs_only_the_sharing() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let prefix = fresh_prefix("stopped");
    let url = redis.url();
    let (handles, load) = two_replicas_under_load(&upstream, &url, &prefix, "stopped").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.stop();
    let stopped = Instant::now();
    let observed = load.await.unwrap();
    assert_eq!(observed.failures, 0, "no error reached a caller");
    let during: Vec<Duration> = observed
        .latencies
        .iter()
        .filter(|(t, _)| *t >= stopped)
        .map(|(_, l)| *l)
        .collect();
    assert!(
        during.len() > 50,
        "only {} answers during the outage",
        during.len()
    );
    let worst = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "redis stopped: {} answers during the outage, worst {worst:?}",
        during.len()
    );
    // At most a command timeout per Redis step (the fetch and the gate) while the breaker
    // is still closed, plus room for a loaded machine.
    assert!(worst < Duration::from_millis(700), "worst {worst:?}");
    for h in &handles {
        assert_eq!(
            metric(h, "embedcar_redis_fallback").await,
            1.0,
            "in fallback"
        );
        assert!(
            metric(h, "embedcar_redis_skipped_total").await > 0.0,
            "the breaker opened"
        );
    }

    redis.restart();
    sharing_resumes(&handles, &url, &prefix).await;
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_slow_costs_only_the_sharing() {
    let Some(redis) = PrivateRedis::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let prefix = fresh_prefix("slow");
    let url = redis.url();
    let (handles, load) = two_replicas_under_load(&upstream, &url, &prefix, "slow").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Redis stalls for 3 s: every command in that time would wait for it.
    let stall = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let _: redis::RedisResult<()> = redis::cmd("DEBUG").arg("SLEEP").arg(3).query(&mut c);
        }
    });
    let stalled = Instant::now();
    let observed = load.await.unwrap();
    stall.await.unwrap();
    assert_eq!(observed.failures, 0, "no error reached a caller");
    let during: Vec<Duration> = observed
        .latencies
        .iter()
        .filter(|(t, _)| *t >= stalled && *t < stalled + Duration::from_secs(3))
        .map(|(_, l)| *l)
        .collect();
    let worst = during.iter().max().copied().unwrap_or_default();
    let slow = during
        .iter()
        .filter(|l| **l >= Duration::from_millis(100))
        .count();
    eprintln!(
        "redis stalled: {} answers during the stall, {slow} of them 100 ms or slower, worst {worst:?}",
        during.len()
    );
    assert!(
        during.len() > 50,
        "only {} answers during the stall",
        during.len()
    );
    assert!(worst < Duration::from_millis(900), "worst {worst:?}");
    // Once the breaker is open no request waits for Redis: only those before it opened, and
    // the probes, paid the command timeout.
    assert!(
        slow * 4 < during.len(),
        "{slow} of {} requests waited for the stalled Redis",
        during.len()
    );
    let timeouts: f64 = {
        let mut total = 0.0;
        for h in &handles {
            total += metric(h, "embedcar_redis_skipped_total").await;
        }
        total
    };
    assert!(timeouts > 0.0, "the breaker opened");
    sharing_resumes(&handles, &url, &prefix).await;
    for h in handles {
        h.shutdown().await.unwrap();
    }
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lua_gate_does_governors_arithmetic() {
    use governor::{clock::FakeRelativeClock, Quota, RateLimiter};
    use std::num::NonZeroU32;
    let Some(url) = redis_url() else { return };
    let metrics = Arc::new(embedcar::metrics::Metrics::new());
    let mut redis_config = embedcar::config::RedisConfig {
        url: Some(url),
        key_prefix: fresh_prefix("gcra"),
        ..Default::default()
    };
    redis_config.command_timeout = Duration::from_secs(2);
    let tier = SharedTier::new(&redis_config, true, metrics)
        .unwrap()
        .expect("a tier");

    // Requests (a burst of 10, one every 6 s), then tokens (600 a minute, n cells a call),
    // each on a schedule of its own: the script's answers must be governor's, to the µs.
    for (kind, per_minute) in [("requests", 10u32), ("tokens", 600u32)] {
        let clock = FakeRelativeClock::default();
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap());
        let local = RateLimiter::direct_with_clock(quota, clock.clone());
        let limits = match kind {
            "requests" => GateLimits::per_minute(per_minute, 0),
            _ => GateLimits::per_minute(0, per_minute),
        };
        let credential = [kind.len() as u8; 32];
        let base_us: u64 = 1_000_000_000_000;
        let mut now_us = 0u64;
        let mut checked = 0;
        for step in 0..200u64 {
            // Irregular steps, sometimes none: bursts, idling, and waits in between.
            let advance_us = [0, 0, 250_000, 1_000_000, 3_700_000, 0, 12_000_000]
                [(step % 7) as usize]
                + step * 1_013;
            now_us += advance_us;
            clock.advance(Duration::from_micros(advance_us));
            let cells = match kind {
                "requests" => 1,
                _ => 1 + (step * 37) % 90,
            };
            let expected = match local.check_n(NonZeroU32::new(cells as u32).unwrap()) {
                Ok(Ok(())) => None,
                Ok(Err(not_until)) => {
                    Some(not_until.wait_time_from(governor::clock::Clock::now(&clock)))
                }
                Err(_) => unreachable!("cells within the burst"),
            };
            let got = tier
                .gate_at(&credential, limits, cells, Some(base_us + now_us))
                .await
                .expect("redis answers");
            match (expected, got) {
                (None, GateAnswer::Go) => {}
                (
                    Some(want),
                    GateAnswer::Wait {
                        wait,
                        closed: false,
                    },
                ) => {
                    let diff = want.abs_diff(wait);
                    assert!(
                        diff <= Duration::from_millis(1),
                        "{kind} step {step}: governor says wait {want:?}, the script {wait:?}"
                    );
                    checked += 1;
                }
                (want, got) => {
                    panic!("{kind} step {step}: governor says {want:?}, the script {got:?}")
                }
            }
        }
        assert!(checked > 10, "{kind}: the schedule never made anyone wait");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_divides_the_budget_by_the_replicas_last_seen() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let upstream = FakeUpstream::start().await;
    let prefix = fresh_prefix("divided");
    let url = redis.url();
    let configs = (0..3)
        .map(|_| {
            let mut c = replica_config(&upstream, &url, &prefix);
            c.limits.requests_per_minute = 60;
            c.limits.request_timeout = Duration::from_secs(1);
            c
        })
        .collect();
    let handles = replicas(configs).await;
    // Every replica has counted the three (heartbeats every 2 s).
    let counted = Instant::now() + Duration::from_secs(10);
    for h in &handles {
        while metric(h, "embedcar_redis_replicas").await != 3.0 {
            assert!(
                Instant::now() < counted,
                "the replicas never counted each other"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    redis.stop();
    upstream.reset_stats();
    let client = client();
    load(&client, &handles[0].url(), "sk-out", "out", 120).await;
    let sent = upstream.embedding_inputs();
    eprintln!("redis down, 3 replicas last seen, 60 rpm: one replica sent {sent}");
    // A third of the budget (a burst of 20, one every 3 s after it), not all of it.
    assert!(
        (10..=30).contains(&sent),
        "one replica sent {sent} of a 60 rpm budget"
    );
    for h in handles {
        h.shutdown().await.unwrap();
    }
}
