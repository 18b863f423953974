//! The `embedcar` binary as an operator runs it: flags, config files, check-config, signals.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use fake_openai::FakeUpstream;
use http::{Response, StatusCode};
use hyper::body::Incoming;
use support::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_embedcar");

/// A running embedcar process; killed if the test ends early.
struct Process {
    child: Child,
    addr: String,
    admin_addr: String,
    /// Every line it prints after the "listening" one.
    logs: std::sync::mpsc::Receiver<String>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Starts the binary on free ports in front of `upstream` and waits for its "listening" line.
fn spawn(upstream: &str, extra_env: &[(&str, &str)]) -> Process {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("embedcar binary runs");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("listening"))
        .expect("a listening line");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {line}"))
            .to_string()
    };
    let (addr, admin_addr) = (field("addr="), field("admin_addr="));
    // Keep draining stdout so the process never blocks on a full pipe.
    let (tx, logs) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Process {
        child,
        addr,
        admin_addr,
        logs,
    }
}

fn signal(p: &Process, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Sends `GET /v1/models` that the fake upstream answers after `delay_ms`, and waits until
/// the upstream is working on it: something in flight for a drain to wait for.
async fn slow_request_in_flight(
    c: &TestClient,
    upstream: &FakeUpstream,
    process: &Process,
    delay_ms: u64,
) -> tokio::task::JoinHandle<Result<Response<Incoming>, hyper_util::client::legacy::Error>> {
    let mut req = get(&format!("http://{}/v1/models", process.addr));
    req.headers_mut()
        .insert("x-fake-delay-ms", delay_ms.to_string().parse().unwrap());
    let slow = tokio::spawn({
        let c = c.clone();
        async move { c.request(req).await }
    });
    assert!(
        upstream
            .wait_until(Duration::from_secs(10), |u| u.in_flight() == 1)
            .await
    );
    slow
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_slow_request_then_exits_zero() {
    let upstream = FakeUpstream::start().await;
    let mut process = spawn(&upstream.url(), &[]);
    let c = client();
    let slow = slow_request_in_flight(&c, &upstream, &process, 1500).await;

    signal(&process, "-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = send(&c, get(&format!("http://{}/readyz", process.admin_addr))).await;
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready while draining"
    );
    assert!(
        tokio::net::TcpStream::connect(&process.addr).await.is_err(),
        "no new connections while draining"
    );

    let r = slow
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(r.status(), StatusCode::OK);
    body_bytes(r).await;

    let status = tokio::task::spawn_blocking(move || process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn a_request_logs_its_request_id_on_its_lines() {
    // Nothing listens on the upstream port, so the request fails and says so in the log.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let p = spawn(&upstream, &[("EMBEDCAR_RETRY__MAX_ATTEMPTS", "1")]);
    let client = client();
    let mut request = get(&format!("http://{}/v1/models", p.addr));
    request.headers_mut().insert(
        "x-request-id",
        http::HeaderValue::from_static("req-from-the-caller-42"),
    );
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let line = std::iter::from_fn(|| p.logs.recv_timeout(Duration::from_secs(5)).ok())
        .find(|l| l.contains("request failed"))
        .expect("a log line for the failed request");
    assert!(
        line.contains("req-from-the-caller-42"),
        "the request id is missing from: {line}"
    );
}

/// An outage logs one WARN line per kind of failure (reason, route, attempts), then at most one
/// per interval; a caller's own bad request is not logged at the default level.
#[tokio::test]
async fn failures_are_logged_once_per_kind_and_bad_requests_not_at_info() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let p = spawn(
        &upstream,
        &[
            ("EMBEDCAR_RETRY__MAX_ATTEMPTS", "2"),
            // Every request reaches the (absent) upstream: no circuit opens to answer for it.
            ("EMBEDCAR_BREAKER__CONNECT_FAILURES", "1000"),
        ],
    );
    let c = client();
    let url = format!("http://{}/v1/embeddings", p.addr);
    let bad = post_json(&url, &serde_json::json!({"model": "m"}));
    assert_eq!(send(&c, bad).await.status(), StatusCode::BAD_REQUEST);
    for _ in 0..5 {
        let r = send(&c, get(&format!("http://{}/v1/models", p.addr))).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    }
    let first = std::iter::from_fn(|| p.logs.recv_timeout(Duration::from_secs(5)).ok())
        .inspect(|l| assert!(!l.contains("invalid_request"), "a 400 logged: {l}"))
        .find(|l| l.contains("request failed"))
        .expect("a log line for the failed requests");
    for part in [
        "WARN",
        "upstream_unreachable",
        "route=\"models\"",
        "status=502",
        "attempts=2",
    ] {
        assert!(first.contains(part), "{part} missing from: {first}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let more: Vec<String> = p
        .logs
        .try_iter()
        .filter(|l| l.contains("request failed"))
        .collect();
    assert!(more.is_empty(), "one line for five like failures: {more:?}");
}

#[tokio::test]
async fn sigint_stops_an_idle_embedcar_at_once() {
    let upstream = FakeUpstream::start().await;
    let mut process = spawn(&upstream.url(), &[]);
    signal(&process, "-INT");
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || process.child.wait()),
    )
    .await
    .expect("stops promptly")
    .unwrap()
    .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_second_signal_during_the_drain_exits_at_once() {
    let upstream = FakeUpstream::start().await;
    let mut process = spawn(&upstream.url(), &[]);
    let c = client();
    // Held for a minute by the upstream: the drain would wait out the whole 30 s grace period.
    let _slow = slow_request_in_flight(&c, &upstream, &process, 60_000).await;
    signal(&process, "-TERM");
    let drained = std::iter::from_fn(|| process.logs.recv_timeout(Duration::from_secs(10)).ok())
        .any(|l| l.contains("draining"));
    assert!(drained, "the first signal starts the drain");
    signal(&process, "-INT");
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || process.child.wait()),
    )
    .await
    .expect("the second signal ends the process without waiting for the grace period")
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
}

#[test]
fn a_bad_config_file_fails_with_a_message_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("embedcar-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[upstream]\nurl = \"https://api.openai.com\"\nfirst_byte_timout = \"5s\"\n",
    )
    .unwrap();
    for args in [vec!["check-config"], vec![]] {
        let out = Command::new(BIN)
            .args(&args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("first_byte_timout"), "{err}");
    }

    std::fs::write(&path, "[limits]\nmax_wait = \"forever\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_wait"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn help_says_what_embedcar_is_for_and_where_configuration_comes_from() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for part in [
        "OPENAI_BASE_URL=http://127.0.0.1:8080/v1",
        "text|json",
        "EMBEDCAR_<SECTION>__<KEY>",
        "check-config",
    ] {
        assert!(help.contains(part), "{part} missing from --help:\n{help}");
    }
}

#[test]
fn check_config_prints_values_as_written_and_warns_about_v1() {
    let out = Command::new(BIN)
        .args(["check-config", "--upstream", "http://127.0.0.1:8000/v1"])
        .env("EMBEDCAR_UPSTREAM__POOL_IDLE_TIMEOUT", "90s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pool_idle_timeout = \"90s\""), "{text}");
    assert!(text.contains("budget_ratio = 0.2\n"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: upstream.url"), "{err}");
    assert!(err.contains("without /v1"), "{err}");
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let out = Command::new(BIN)
        .args(["check-config", "--upstream", "http://127.0.0.1:8000"])
        .env("EMBEDCAR_LIMITS__MAX_CONCURRENCY", "12")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let printed: toml::Value = toml::from_str(&text).expect("valid TOML");
    assert_eq!(
        printed["upstream"]["url"].as_str(),
        Some("http://127.0.0.1:8000")
    );
    assert_eq!(printed["limits"]["max_concurrency"].as_integer(), Some(12));
    assert_eq!(printed["upstream"]["connect_timeout"].as_str(), Some("5s"));
}

#[test]
fn the_example_config_lists_every_default() {
    let text = include_str!("../config/embedcar.toml");
    let example: embedcar::Config = toml::from_str(text).expect("the example parses");
    assert_eq!(example, embedcar::Config::default());
    // Equal values alone prove nothing: every section is `#[serde(default)]`, so a key left out
    // of the file parses as its default. Compare the keys themselves with the full default tree.
    let written: toml::Value = toml::from_str(text).unwrap();
    let defaults = toml::Value::try_from(embedcar::Config::default()).unwrap();
    let mut missing = Vec::new();
    missing_keys(&defaults, &written, "", &mut missing);
    assert!(
        missing.is_empty(),
        "config/embedcar.toml does not list {missing:?}"
    );
}

/// Every key (as `section.key`) of `full` that `shown` does not have, at any depth.
fn missing_keys(full: &toml::Value, shown: &toml::Value, at: &str, out: &mut Vec<String>) {
    let Some(table) = full.as_table() else { return };
    for (key, value) in table {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        match shown.get(key) {
            Some(there) => missing_keys(value, there, &path, out),
            None => out.push(path),
        }
    }
}

#[test]
fn the_example_config_is_valid() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/embedcar.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_single_threaded_embedcar_serves_embeddings_and_drains() {
    let upstream = FakeUpstream::start().await;
    let mut process = spawn(&upstream.url(), &[("EMBEDCAR_SERVER__WORKER_THREADS", "1")]);
    let c = client();
    let url = format!("http://{}/v1/embeddings", process.addr);
    let callers: Vec<_> = (0..20)
        .map(|i| {
            let req = post_json(
                &url,
                &serde_json::json!({"input": format!("single {i}"), "model": "text-embedding-3-small"}),
            );
            let c = c.clone();
            tokio::spawn(async move { c.request(req).await.map(|r| r.status()) })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap(), StatusCode::OK);
    }
    signal(&process, "-TERM");
    let status = tokio::task::spawn_blocking(move || process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// Environment variables for a child process.
type Env<'a> = Vec<(&'a str, &'a str)>;

/// Runs `embedcar health ARGS` with `env`; its exit code, stdout, stderr and how long it took.
/// Waits until the instance's `/readyz` says ready (the tokenizer's tables load at start).
async fn wait_ready(admin: &str) {
    let c = client();
    let url = format!("http://{admin}/readyz");
    for _ in 0..600 {
        if let Ok(r) = c.request(get(&url)).await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{admin} did not become ready within 30 s");
}

async fn health(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String, Duration) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("health").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = std::time::Instant::now();
    let out = cmd.output().await.expect("embedcar health runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn health_exits_zero_for_a_ready_instance_found_the_way_it_finds_its_address() {
    let upstream = FakeUpstream::start().await;
    let process = spawn(&upstream.url(), &[]);
    let admin = process.admin_addr.as_str();
    wait_ready(admin).await;
    let port = admin.rsplit(':').next().unwrap();
    let on_every_interface = format!("0.0.0.0:{port}");
    let dir = std::env::temp_dir().join(format!("embedcar-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("embedcar.toml");
    std::fs::write(
        &file,
        format!("[server]\nadmin_listen = \"{on_every_interface}\"\n"),
    )
    .unwrap();
    let file = file.display().to_string();
    let url = format!("http://{admin}/readyz");
    let cases: [(Vec<&str>, Env); 5] = [
        (vec!["--admin-listen", admin], vec![]),
        // Bound to every interface (as in a container): probed on loopback.
        (
            vec![],
            vec![("EMBEDCAR_SERVER__ADMIN_LISTEN", &on_every_interface)],
        ),
        (vec!["--config", &file], vec![]),
        (vec!["--addr", admin], vec![]),
        (vec!["--url", &url], vec![]),
    ];
    for (args, env) in cases {
        let (code, stdout, stderr, _) = health(&args, &env).await;
        assert_eq!(code, Some(0), "{args:?} {env:?}: {stdout}{stderr}");
        assert!(stdout.contains("ready"), "{stdout}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn health_exits_one_for_a_draining_instance() {
    let upstream = FakeUpstream::start().await;
    let mut process = spawn(&upstream.url(), &[]);
    wait_ready(&process.admin_addr).await;
    let c = client();
    // A slow request keeps the instance draining (not ready, still up) after SIGTERM.
    let slow = slow_request_in_flight(&c, &upstream, &process, 4000).await;
    let (code, ..) = health(&["--admin-listen", &process.admin_addr], &[]).await;
    assert_eq!(code, Some(0), "ready before SIGTERM");

    signal(&process, "-TERM");
    let readyz = format!("http://{}/readyz", process.admin_addr);
    let started = std::time::Instant::now();
    while send(&c, get(&readyz)).await.status() != StatusCode::SERVICE_UNAVAILABLE {
        assert!(started.elapsed() < Duration::from_secs(3), "never draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, stdout, stderr, _) = health(&["--admin-listen", &process.admin_addr], &[]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("not ready") && stderr.contains("503") && stderr.contains("draining"),
        "{stderr}"
    );
    assert!(
        upstream.in_flight() == 1,
        "the probe ran while the slow request was still in flight"
    );

    let r = slow
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(r.status(), StatusCode::OK);
    let status = tokio::task::spawn_blocking(move || process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn health_exits_one_quickly_when_nothing_listens() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    // A 30 s timeout: a refused connection is reported at once, not when the timeout ends.
    let (code, stdout, stderr, took) =
        health(&["--admin-listen", &addr, "--timeout", "30s"], &[]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[tokio::test]
async fn health_gives_up_on_a_silent_listener_at_its_timeout() {
    // Connections are accepted by the kernel but never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    // Longer than the 2 s default, so giving up at the default instead is caught.
    let (code, _, stderr, took) = health(&["--addr", &addr, "--timeout", "3s"], &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(stderr.contains("within 3s"), "{stderr}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "took {took:?}"
    );
    drop(silent);
}

#[tokio::test]
async fn health_exits_one_not_two_on_a_bad_config() {
    // Docker reserves exit status 2; a health check reports every failure as 1.
    let (code, _, stderr, _) = health(&[], &[("EMBEDCAR_SERVER__ADMIN_LISTEN", "nowhere")]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("server.admin_listen"), "{stderr}");
}
