//! Hardening end to end through a real embedcar in front of the fake upstream: compressed
//! request bodies, the bound on request bodies held in memory, and connections at the cap.

mod support;

use std::{io::Write, time::Duration};

use bytes::Bytes;
use fake_openai::{
    decode_embedding, expected_embedding, EmbeddingInput, FakeOptions, FakeUpstream,
};
use http::{Request, StatusCode};
use serde_json::{json, Value};
use support::harness::*;

// ---------------------------------------------------------------------------------------------
// Content-Encoding on embeddings requests

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// A POST of `body` as it is, labelled with `encoding`.
fn post_encoded(
    url: &str,
    body: impl Into<Bytes>,
    encoding: &str,
) -> Request<embedcar::body::ProxyBody> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("content-encoding", encoding)
        .header("authorization", "Bearer sk-test")
        .body(embedcar::body::full(body))
        .unwrap()
}

/// Asserts a reply carries the fake's vectors for `inputs`, in order.
fn assert_vectors(reply: &Value, inputs: &[&str]) {
    let dims = FakeOptions::default().dims;
    let data = reply["data"].as_array().expect("data");
    assert_eq!(data.len(), inputs.len(), "{reply}");
    for (d, input) in data.iter().zip(inputs) {
        let got = decode_embedding(&d["embedding"]).expect("a vector");
        let want = expected_embedding(&EmbeddingInput::Text(input.to_string()), dims);
        assert_eq!(got, want, "vector of {input:?}");
    }
}

#[tokio::test]
async fn compressed_embeddings_requests_are_decoded_and_sent_upstream_unlabelled() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let url = format!("{}/v1/embeddings", proxy.url());

    type Encoder = fn(&[u8]) -> Vec<u8>;
    let encoders: [(&str, Encoder); 4] = [
        ("gzip", gzip),
        ("deflate", deflate),
        ("zstd", zstd),
        ("GZip", gzip),
    ];
    for (name, encode) in encoders {
        let inputs = [format!("{name} one"), format!("{name} two")];
        let request = json!({"model": "text-embedding-3-small", "input": inputs,
                             "encoding_format": "float"});
        let r = send(
            &client(),
            post_encoded(&url, encode(request.to_string().as_bytes()), name),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "{name}");
        assert_vectors(&body_json(r).await, &[&inputs[0], &inputs[1]]);

        let seen = upstream.requests().pop().expect("an upstream call");
        assert_eq!(
            seen.header("content-encoding"),
            None,
            "{name}: label over plain JSON"
        );
        assert!(seen.json().is_some(), "{name}: the upstream got plain JSON");
    }
}

#[tokio::test]
async fn a_compressed_request_with_an_unknown_field_passes_through_decoded() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let request = json!({"model": "text-embedding-3-small", "input": ["x"], "future_param": 1});

    let r = send(
        &client(),
        post_encoded(
            &format!("{}/v1/embeddings", proxy.url()),
            gzip(request.to_string().as_bytes()),
            "gzip",
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let seen = upstream.requests().pop().expect("an upstream call");
    assert_eq!(seen.header("content-encoding"), None);
    assert_eq!(seen.json(), Some(request));
}

#[tokio::test]
async fn a_body_that_is_not_what_its_label_says_gets_a_400_and_reaches_no_one() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let plain = json!({"model": "text-embedding-3-small", "input": ["hello"]}).to_string();

    for label in ["gzip", "deflate", "br", "zstd"] {
        let r = send(
            &client(),
            post_encoded(
                &format!("{}/v1/embeddings", proxy.url()),
                plain.clone(),
                label,
            ),
        )
        .await;
        let e = expect_openai_error(r, StatusCode::BAD_REQUEST).await;
        assert!(e["message"].as_str().unwrap().contains(label), "{e}");
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn a_body_that_inflates_past_the_body_limit_gets_a_413() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.server.max_body_bytes = 64 * 1024;
    let proxy = start_proxy(config).await;
    // 1 MiB of spaces around a valid request compresses to about a kilobyte.
    let mut bomb = json!({"model": "text-embedding-3-small", "input": ["x"]}).to_string();
    bomb.push_str(&" ".repeat(1024 * 1024));

    let r = send(
        &client(),
        post_encoded(
            &format!("{}/v1/embeddings", proxy.url()),
            gzip(bomb.as_bytes()),
            "gzip",
        ),
    )
    .await;
    let e = expect_openai_error(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(e["code"], "request_too_large");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn a_body_in_an_unknown_coding_passes_through_unchanged_with_its_label() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    let body = json!({"model": "text-embedding-3-small", "input": ["hello"]}).to_string();

    let r = send(
        &client(),
        post_encoded(
            &format!("{}/v1/embeddings", proxy.url()),
            body.clone(),
            "foo",
        ),
    )
    .await;
    body_bytes(r).await;
    let seen = upstream.requests().pop().expect("passed through");
    assert_eq!(seen.header("content-encoding"), Some("foo"));
    assert_eq!(
        seen.body,
        body.as_bytes(),
        "the bytes as the caller sent them"
    );
}

// ---------------------------------------------------------------------------------------------
// The budget of request bodies held in memory

/// An embeddings request of about `size` bytes (JSON padded with whitespace: large to hold,
/// cheap to parse and embed).
fn padded_request(input: &str, size: usize) -> String {
    let mut body = json!({"model": "text-embedding-3-small", "input": [input]}).to_string();
    body.push_str(&" ".repeat(size.saturating_sub(body.len())));
    body
}

fn post_slow(url: &str, body: String, delay_ms: u64) -> Request<embedcar::body::ProxyBody> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .header("x-fake-delay-ms", delay_ms.to_string())
        .body(embedcar::body::full(body))
        .unwrap()
}

#[tokio::test]
async fn bodies_over_the_buffer_budget_get_503_with_retry_after_and_the_budget_comes_back() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.server.max_buffered_request_bytes = 1024 * 1024;
    let proxy = start_proxy(config).await;
    let url = format!("{}/v1/embeddings", proxy.url());

    // One 700 KiB body held while its upstream call takes a second...
    let held = tokio::spawn({
        let req = post_slow(&url, padded_request("held", 700 * 1024), 1000);
        async move { send(&client(), req).await.status() }
    });
    assert!(
        upstream
            .wait_until(Duration::from_secs(10), |u| u.in_flight() == 1)
            .await
    );
    // ...leaves no room for three more at once.
    let refused = futures_util::future::join_all((0..3).map(|i| {
        let req = post_slow(&url, padded_request(&format!("extra {i}"), 700 * 1024), 0);
        async move { send(&client(), req).await }
    }))
    .await;
    for r in refused {
        assert!(r.headers().contains_key("retry-after"));
        let e = expect_openai_error(r, StatusCode::SERVICE_UNAVAILABLE).await;
        assert_eq!(e["code"], "request_buffers_full");
    }
    assert_eq!(held.await.unwrap(), StatusCode::OK);

    let (_, metrics) = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "embedcar_request_buffer_bytes"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "embedcar_shed_requests_total{reason=\"request_buffers_full\"}"
        ),
        Some(3.0)
    );
    let r = send(
        &client(),
        post_slow(&url, padded_request("later", 700 * 1024), 0),
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "room again once the others finished"
    );
}

#[tokio::test]
async fn a_streamed_body_is_counted_as_it_arrives_and_one_larger_than_the_budget_gets_413() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.server.max_buffered_request_bytes = 256 * 1024;
    let proxy = start_proxy(config).await;
    let url = format!("{}/v1/embeddings", proxy.url());

    // No Content-Length: chunks of 64 KiB, the budget found spent part way.
    let body = padded_request("streamed", 512 * 1024);
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = body
        .as_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let streamed = http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
        http_body_util::StreamBody::new(futures_util::stream::iter(chunks)),
        |never| -> embedcar::body::BoxError { match never {} },
    ));
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .body(streamed)
        .unwrap();
    let r = send(&client(), req).await;
    expect_openai_error(r, StatusCode::PAYLOAD_TOO_LARGE).await;

    // Declared larger than the whole budget: it could never fit, so no Retry-After.
    let r = send(&client(), post_slow(&url, body, 0)).await;
    assert!(!r.headers().contains_key("retry-after"));
    expect_openai_error(r, StatusCode::PAYLOAD_TOO_LARGE).await;

    let (_, metrics) = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "embedcar_request_buffer_bytes"),
        Some(0.0)
    );
    assert_eq!(upstream.request_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Connections at server.max_connections

type Sender = hyper::client::conn::http1::SendRequest<embedcar::body::ProxyBody>;

/// A keep-alive HTTP/1.1 connection of its own (a pooled client would share one).
async fn connect(proxy: &embedcar::Handle) -> Sender {
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// `GET /v1/models` on `sender`, the upstream taking `delay_ms`; the status and body.
async fn models(sender: &mut Sender, delay_ms: u64) -> Result<StatusCode, hyper::Error> {
    let req = Request::get("/v1/models")
        .header("host", "embedcar")
        .header("x-fake-delay-ms", delay_ms.to_string())
        .body(embedcar::body::empty())
        .unwrap();
    sender.ready().await?;
    let r = sender.send_request(req).await?;
    let status = r.status();
    http_body_util::BodyExt::collect(r.into_body()).await?;
    Ok(status)
}

#[tokio::test]
async fn at_the_connection_cap_an_idle_keep_alive_connection_makes_room_for_a_new_client() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.server.max_connections = 4;
    let proxy = start_proxy(config).await;

    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = connect(&proxy).await;
        assert_eq!(models(&mut c, 0).await.unwrap(), StatusCode::OK);
        idle.push(c);
    }
    let mut fifth = connect(&proxy).await;
    let answered = tokio::time::timeout(Duration::from_secs(2), models(&mut fifth, 0)).await;
    assert_eq!(
        answered
            .expect("answered well within header_read_timeout")
            .unwrap(),
        StatusCode::OK
    );

    let (_, metrics) = admin_text(&proxy, "/metrics").await;
    assert!(metric_value(&metrics, "embedcar_connections_reclaimed_total").unwrap() >= 1.0);
    assert!(
        idle.iter().any(|c| c.is_closed()),
        "an idle connection was closed"
    );
}

#[tokio::test]
async fn at_the_connection_cap_a_connection_with_a_request_in_flight_is_never_cut() {
    let upstream = FakeUpstream::start().await;
    let mut config = config_for(&upstream.url());
    config.server.max_connections = 4;
    let proxy = start_proxy(config).await;

    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut c = connect(&proxy).await;
        busy.push(tokio::spawn(async move {
            let status = models(&mut c, 1500).await;
            // The connection stays open (and idle) with its client.
            (status, tokio::time::Instant::now(), c)
        }));
    }
    assert!(
        upstream
            .wait_until(Duration::from_secs(10), |u| u.in_flight() == 4)
            .await
    );
    let mut fifth = connect(&proxy).await;
    let answered = tokio::time::timeout(Duration::from_secs(5), models(&mut fifth, 0)).await;
    let fifth_done = tokio::time::Instant::now();

    let mut first_done = None;
    let mut kept_open = Vec::new();
    for b in busy {
        let (status, done, c) = b.await.unwrap();
        kept_open.push(c);
        assert_eq!(
            status.expect("a slow request finished, not cut"),
            StatusCode::OK
        );
        first_done = Some(first_done.map_or(done, |d: tokio::time::Instant| d.min(done)));
    }
    assert_eq!(
        answered
            .expect("answered once a connection went idle")
            .unwrap(),
        StatusCode::OK
    );
    assert!(
        fifth_done >= first_done.unwrap(),
        "the fifth waited for a busy connection to finish"
    );
}
