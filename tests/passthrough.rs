//! End to end through a real embedcar on port 0 in front of the fake upstream: what the caller
//! sends arrives unchanged, what the upstream answers comes back unchanged and as it is
//! produced, and embedcar's own failures are fast, bounded and shaped like OpenAI's.

mod support;

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use fake_openai::{Behavior, FakeOptions, FakeUpstream};
use http::{Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::json;
use support::harness::*;

#[tokio::test]
async fn methods_paths_queries_headers_and_bodies_arrive_unchanged() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let client = client();

    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ] {
        let body = format!("body of a {method} request \u{2713}");
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("{}/v1/some/thing?limit=2&after=x%20y", proxy.url()))
            .header("authorization", "Bearer sk-caller")
            .header("openai-organization", "org-1")
            .header("x-custom", "a")
            .header("x-custom-multi", "1")
            .header("content-type", "text/plain")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "must not pass")
            .header("keep-alive", "timeout=5")
            .body(embedcar::body::full(body.clone()))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-fake-method"], method.as_str());
        assert_eq!(body_bytes(r).await, body.as_bytes());

        let seen = upstream.requests().pop().unwrap();
        assert_eq!(seen.method, method);
        assert_eq!(seen.uri.path(), "/v1/some/thing");
        assert_eq!(seen.uri.query(), Some("limit=2&after=x%20y"));
        assert_eq!(seen.body, body.as_bytes());
        assert_eq!(seen.header("authorization"), Some("Bearer sk-caller"));
        assert_eq!(seen.header("openai-organization"), Some("org-1"));
        assert_eq!(seen.header("x-custom"), Some("a"));
        assert_eq!(seen.header("content-type"), Some("text/plain"));
        assert_eq!(
            seen.header("host"),
            Some(upstream.addr().to_string().as_str())
        );
        assert_eq!(
            seen.header("x-hop"),
            None,
            "headers named by Connection are hop-by-hop"
        );
        assert_eq!(seen.header("keep-alive"), None);
    }
}

#[tokio::test]
async fn the_upstream_path_prefix_and_azure_paths_are_kept() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&format!("{}/gateway/openai", upstream.url()))).await;
    let r = send(&client(), get(&format!("{}/v1/models", proxy.url()))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        upstream.requests().pop().unwrap().uri.path(),
        "/gateway/openai/v1/models"
    );

    let proxy = start_proxy(config_for(&upstream.url())).await;
    let azure = format!(
        "{}/openai/deployments/emb-small/embeddings?api-version=2024-02-01",
        proxy.url()
    );
    let r = send(&client(), post_json(&azure, &json!({"input": "hi"}))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.uri.path(), "/openai/deployments/emb-small/embeddings");
    assert_eq!(seen.uri.query(), Some("api-version=2024-02-01"));
}

#[tokio::test]
async fn the_upstreams_reply_comes_back_unchanged_with_its_request_id() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let request = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let path = "/v1/chat/completions";

    let direct = send(
        &client(),
        post_json(&format!("{}{path}", upstream.url()), &request),
    )
    .await;
    let direct_body = body_json(direct).await;
    let through = send(
        &client(),
        post_json(&format!("{}{path}", proxy.url()), &request),
    )
    .await;
    assert_eq!(through.status(), StatusCode::OK);
    let id = through.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        id.starts_with("req_fake_"),
        "the upstream's request id wins: {id}"
    );
    let mut through_body = body_json(through).await;
    // The fake stamps each completion with its own id; everything else must be equal.
    through_body["id"] = direct_body["id"].clone();
    assert_eq!(through_body, direct_body);

    // embedcar's own replies carry an id too: the caller's, or a new one.
    let upstream_down = start_proxy(config_for("http://127.0.0.1:9")).await;
    let mut req = get(&format!("{}/v1/models", upstream_down.url()));
    req.headers_mut()
        .insert("x-request-id", "caller-id-1".parse().unwrap());
    let r = send(&client(), req).await;
    assert_eq!(r.headers()["x-request-id"], "caller-id-1");
}

#[tokio::test]
async fn both_http1_and_cleartext_http2_clients_are_served() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    for c in [client(), h2_client()] {
        let r = send(&c, get(&format!("{}/v1/models", proxy.url()))).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v = body_json(r).await;
        assert_eq!(v["object"], "list");
    }
}

/// A request body whose chunks the test releases one at a time.
fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, embedcar::body::ProxyBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let body = StreamBody::new(stream)
        .map_err(|e: Infallible| -> embedcar::body::BoxError { match e {} })
        .boxed_unsync();
    (tx, body)
}

#[tokio::test]
async fn a_large_request_body_streams_to_the_upstream_before_it_is_complete() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let (tx, body) = channel_body();
    let req = Request::post(format!("{}/v1/files", proxy.url()))
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let client = client();
    let pending = tokio::spawn(async move { client.request(req).await });

    // 1 MiB goes out; the upstream must see it while the rest has not even been produced.
    let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
    tx.send(chunk.clone()).await.unwrap();
    let arrived = upstream
        .wait_until(Duration::from_secs(10), |u| {
            u.body_bytes_received() >= 1024 * 1024
        })
        .await;
    assert!(
        arrived,
        "the first chunk did not reach the upstream before the body ended"
    );
    for _ in 0..15 {
        tx.send(chunk.clone()).await.unwrap();
    }
    drop(tx);

    let r = pending.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body_bytes(r).await.len(), 16 * 1024 * 1024);
    assert_eq!(
        upstream.requests().pop().unwrap().body.len(),
        16 * 1024 * 1024
    );
}

#[tokio::test]
async fn server_sent_events_reach_the_caller_before_the_upstream_finishes() {
    let upstream = FakeUpstream::start_with(FakeOptions {
        stream_chunks: 4,
        stream_interval: Duration::from_millis(5),
        ..Default::default()
    })
    .await;
    upstream.hold_streams(true);
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let request = json!({"model": "gpt-4o-mini", "stream": true,
                         "messages": [{"role": "user", "content": "hi"}]});
    let r = send(
        &client(),
        post_json(&format!("{}/v1/chat/completions", proxy.url()), &request),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let content_type = r.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );

    // Every chunk but the last is readable while the upstream holds its stream open.
    let mut body = r.into_body();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("chunks arrive while the upstream is still streaming")
            .expect("stream still open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    assert!(!seen.contains("[DONE]"));

    upstream.release_streams();
    let rest = body.collect().await.unwrap().to_bytes();
    seen.push_str(std::str::from_utf8(&rest).unwrap());
    assert_eq!(seen.matches("data: ").count(), 5, "{seen}");
    assert!(seen.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test]
async fn a_held_key_replaces_the_callers_key() {
    let upstream = FakeUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("embedcar-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, "sk-held-by-embedcar\n").unwrap();

    let mut config = config_for(&upstream.url());
    config.credentials.api_key_file = Some(key_file.display().to_string());
    let proxy = start_proxy(config).await;
    let mut req = get(&format!("{}/v1/models", proxy.url()));
    req.headers_mut()
        .insert("authorization", "Bearer dummy".parse().unwrap());
    let r = send(&client(), req).await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-held-by-embedcar")
    );

    // Azure style: the key goes in api-key.
    let mut config = config_for(&upstream.url());
    config.credentials.api_key_env = Some("EMBEDCAR_TEST_AZURE_KEY".into());
    config.credentials.header = embedcar::config::CredentialHeader::ApiKey;
    std::env::set_var("EMBEDCAR_TEST_AZURE_KEY", "azure-secret");
    let proxy = start_proxy(config).await;
    let r = send(&client(), get(&format!("{}/v1/models", proxy.url()))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.header("api-key"), Some("azure-secret"));
    assert_eq!(seen.header("authorization"), None);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_missing_held_key_stops_embedcar_from_starting_without_printing_it() {
    let mut config = config_for("http://127.0.0.1:9");
    config.credentials.api_key_env = Some("EMBEDCAR_TEST_UNSET_KEY_VAR".into());
    let err = embedcar::start(config)
        .await
        .err()
        .expect("refuses to start");
    assert!(
        err.to_string().contains("EMBEDCAR_TEST_UNSET_KEY_VAR"),
        "{err}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_whether_declared_or_streamed() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.server.max_body_bytes = 1000;
    let proxy = start_proxy(config).await;

    let big = "x".repeat(2000);
    let r = send(
        &client(),
        post_json(
            &format!("{}/v1/embeddings", proxy.url()),
            &json!({"input": big}),
        ),
    )
    .await;
    let e = expect_openai_error(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(e["code"], "request_too_large");
    assert_eq!(
        upstream.request_count(),
        0,
        "a declared oversize body never goes upstream"
    );

    // Chunked, no Content-Length: cut off once it passes the limit.
    let (tx, body) = channel_body();
    let req = Request::post(format!("{}/v1/files", proxy.url()))
        .body(body)
        .unwrap();
    let c = client();
    let pending = tokio::spawn(async move { c.request(req).await });
    for _ in 0..4 {
        if tx.send(Bytes::from(vec![b'y'; 400])).await.is_err() {
            break;
        }
    }
    drop(tx);
    let r = pending.await.unwrap().unwrap();
    expect_openai_error(r, StatusCode::PAYLOAD_TOO_LARGE).await;
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502() {
    // Bind and drop a listener so the port is (very likely) closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = start_proxy(config_for(&format!("http://127.0.0.1:{port}"))).await;
    let r = send(&client(), get(&format!("{}/v1/models", proxy.url()))).await;
    let e = expect_openai_error(r, StatusCode::BAD_GATEWAY).await;
    assert_eq!(e["code"], "upstream_unreachable");
}

#[tokio::test]
async fn an_upstream_that_drops_the_connection_gets_502() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Drop);
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let r = send(&client(), get(&format!("{}/v1/models", proxy.url()))).await;
    expect_openai_error(r, StatusCode::BAD_GATEWAY).await;
}

#[tokio::test]
async fn no_free_slot_within_the_wait_budget_gets_503_with_retry_after_at_once() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Hang);
    let mut config = config_for(&upstream.url());
    config.limits.max_concurrency = 1;
    config.limits.max_wait = Duration::from_millis(200);
    let proxy = start_proxy(config).await;

    let c = client();
    let url = format!("{}/v1/models", proxy.url());
    let hog = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        async move { c.request(get(&url)).await }
    });
    assert!(
        upstream
            .wait_until(Duration::from_secs(5), |u| u.in_flight() == 1)
            .await
    );

    let started = std::time::Instant::now();
    let r = send(&c, get(&url)).await;
    let waited = started.elapsed();
    assert!(r.headers().contains_key("retry-after"));
    let e = expect_openai_error(r, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(e["code"], "proxy_overloaded");
    assert!(
        waited < Duration::from_secs(5),
        "shed after the budget, not later: {waited:?}"
    );
    assert_eq!(upstream.request_count(), 1);
    hog.abort();
}

#[tokio::test]
async fn an_upstream_slower_than_the_first_byte_deadline_gets_504() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Hang);
    let mut config = config_for(&upstream.url());
    config.upstream.first_byte_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let r = send(&client(), get(&format!("{}/v1/models", proxy.url()))).await;
    let e = expect_openai_error(r, StatusCode::GATEWAY_TIMEOUT).await;
    assert_eq!(e["code"], "upstream_timeout");
    // The abandoned upstream request is cancelled, not left running.
    assert!(
        upstream
            .wait_until(Duration::from_secs(5), |u| u.in_flight() == 0)
            .await
    );
}

#[tokio::test]
async fn a_slow_answer_within_the_first_byte_timeout_is_not_cut_by_the_embeddings_deadline() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.limits.request_timeout = Duration::from_secs(1);
    config.upstream.first_byte_timeout = Duration::from_secs(30);
    let proxy = start_proxy(config).await;
    let mut req = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "think"}]}),
    );
    req.headers_mut()
        .insert("x-fake-delay-ms", "2000".parse().unwrap());

    let r = send(&client(), req).await;

    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn a_post_that_times_out_waiting_for_the_upstream_is_not_sent_again() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.upstream.first_byte_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let mut req = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "once"}]}),
    );
    req.headers_mut()
        .insert("x-fake-hang", "1".parse().unwrap());

    let r = send(&client(), req).await;

    // The upstream may be working on it: a second copy could run it twice.
    let e = expect_openai_error(r, StatusCode::GATEWAY_TIMEOUT).await;
    assert_eq!(e["code"], "upstream_timeout");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn a_get_that_times_out_waiting_for_the_upstream_is_retried() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.upstream.first_byte_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let req = Request::get(format!("{}/v1/models", proxy.url()))
        .header("x-fake-hang", "1")
        .header("x-fake-times", "1")
        .header("x-fake-key", "a-get-that-times-out")
        .body(embedcar::body::empty())
        .unwrap();

    let r = send(&client(), req).await;

    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn a_stream_that_stops_moving_is_cut_at_the_idle_timeout() {
    let upstream = FakeUpstream::start_with(FakeOptions {
        stream_chunks: 3,
        stream_interval: Duration::from_millis(5),
        ..Default::default()
    })
    .await;
    upstream.hold_streams(true);
    let mut config = config_for(&upstream.url());
    config.upstream.body_idle_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let request = json!({"model": "m", "stream": true, "messages": []});
    let r = send(
        &client(),
        post_json(&format!("{}/v1/chat/completions", proxy.url()), &request),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let outcome = tokio::time::timeout(Duration::from_secs(10), r.into_body().collect()).await;
    assert!(
        outcome.expect("cut, not hung").is_err(),
        "a stalled stream ends with an error, not a clean end"
    );
    let (_, metrics) = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "embedcar_deadline_expired_total{kind=\"body_idle\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn two_hundred_concurrent_callers_never_exceed_the_upstream_concurrency_cap() {
    // A pass-through route: embeddings would be merged into few calls by the engine.
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Delay(Duration::from_millis(20)));
    let mut config = config_for(&upstream.url());
    config.limits.max_concurrency = 8;
    config.limits.max_wait = Duration::from_secs(60);
    let proxy = start_proxy(config).await;

    let c = client();
    let url = format!("{}/v1/chat/completions", proxy.url());
    let callers: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            let req = post_json(
                &url,
                &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("caller {i}")}]}),
            );
            tokio::spawn(async move { c.request(req).await.map(|r| r.status()) })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(upstream.request_count(), 200);
    assert!(
        upstream.peak_concurrency() <= 8,
        "peak {}",
        upstream.peak_concurrency()
    );
    assert!(
        upstream.peak_concurrency() >= 2,
        "the cap was not exercised"
    );
}

#[tokio::test]
async fn admin_endpoints_answer_and_metrics_move() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    assert_eq!(admin_text(&proxy, "/healthz").await.0, StatusCode::OK);
    wait_ready(&proxy).await;
    assert_eq!(admin_text(&proxy, "/readyz").await.0, StatusCode::OK);
    assert_eq!(admin_text(&proxy, "/nope").await.0, StatusCode::NOT_FOUND);

    let c = client();
    for _ in 0..3 {
        let r = send(&c, get(&format!("{}/v1/models", proxy.url()))).await;
        body_bytes(r).await;
    }
    let (status, m) = admin_text(&proxy, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let series = "embedcar_requests_total{method=\"GET\",route=\"models\",status=\"200\"}";
    assert_eq!(metric_value(&m, series), Some(3.0), "{m}");
    assert_eq!(
        metric_value(
            &m,
            "embedcar_upstream_requests_total{route=\"models\",status=\"200\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "embedcar_request_duration_seconds_count{method=\"GET\",route=\"models\"}"
        ),
        Some(3.0)
    );
    assert_eq!(metric_value(&m, "embedcar_requests_in_flight"), Some(0.0));
    assert_eq!(metric_value(&m, "embedcar_upstream_in_flight"), Some(0.0));
    assert!(metric_value(&m, "embedcar_connections_total").unwrap() >= 1.0);
    assert!(m.contains("embedcar_concurrency_wait_seconds_bucket"));
}

#[tokio::test]
async fn a_silent_client_is_disconnected_after_the_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.server.header_read_timeout = Duration::from_millis(200);
    let proxy = start_proxy(config).await;

    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not held open: {read:?}"
    );

    // Half a request head is cut off too.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    assert!(read.is_ok(), "a stalled request head is not held open");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Delay(Duration::from_millis(500)));
    let mut proxy = start_proxy(config_for(&upstream.url())).await;
    let c = client();
    let url = format!("{}/v1/models", proxy.url());
    let in_flight = tokio::spawn(async move { c.request(get(&url)).await });
    assert!(
        upstream
            .wait_until(Duration::from_secs(5), |u| u.in_flight() == 1)
            .await
    );

    proxy.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        admin_text(&proxy, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let refused = tokio::net::TcpStream::connect(proxy.addr).await;
    assert!(refused.is_err(), "the listener is closed while draining");

    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    body_bytes(r).await;
    proxy.shutdown().await.unwrap();
}
