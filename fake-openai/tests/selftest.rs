//! Self-test of the fake OpenAI upstream (this crate). embedcar's tests trust the fake's answers
//! and counters, so the fake itself is checked here, talking to it directly (hyper's client, or a
//! raw socket where the exact bytes and timing matter).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use fake_openai::*;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("missing header {name}"))
            .to_str()
            .unwrap()
    }
}

async fn send(
    c: &HttpClient,
    method: Method,
    url: String,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .expect("request to the fake");
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

async fn post_json(c: &HttpClient, url: String, headers: &[(&str, &str)], body: Value) -> Reply {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(c, Method::POST, url, &h, body.to_string()).await
}

fn assert_bits_eq(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "component {i}: {g} != {w}");
    }
}

#[test]
fn expected_embedding_is_deterministic_bounded_and_varied() {
    let inputs = [
        EmbeddingInput::from("hello world"),
        EmbeddingInput::from("1"),
        EmbeddingInput::Tokens(vec![1]),
        EmbeddingInput::Tokens(vec![0, 0, 0]),
    ];
    for input in &inputs {
        for dims in 1..=16 {
            let v = expected_embedding(input, dims);
            assert_eq!(v, expected_embedding(input, dims));
            assert_eq!(v.len(), dims);
            assert!(v.iter().all(|x| x.is_finite() && (-1.0..=1.0).contains(x)));
            if dims >= 2 {
                assert!(v.iter().any(|x| *x != v[0]), "all equal: {v:?}");
            }
        }
    }
    assert_ne!(
        expected_embedding(&inputs[1], 8),
        expected_embedding(&inputs[2], 8),
        "text and tokens must not collide"
    );
    assert_eq!(
        fake_token_count(&EmbeddingInput::from("  a b\tc ")),
        3,
        "words"
    );
    assert_eq!(
        fake_token_count(&EmbeddingInput::from(" ")),
        1,
        "at least 1"
    );
    assert_eq!(fake_token_count(&EmbeddingInput::Tokens(vec![5, 6])), 2);
}

#[test]
fn base64_matches_rfc4648() {
    for (plain, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_encode(plain.as_bytes()), enc);
        assert_eq!(base64_decode(enc).unwrap(), plain.as_bytes());
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
    assert!(base64_decode("Zm9").is_none());
    assert!(base64_decode("Zg=a").is_none());
    assert!(base64_decode("Z===").is_none());
}

#[tokio::test]
async fn embeddings_in_all_input_forms_and_encodings() {
    let fake = FakeUpstream::start().await;
    let c = client();
    let forms: Vec<(Value, Vec<EmbeddingInput>)> = vec![
        (json!("one two three"), vec!["one two three".into()]),
        (json!(["a", "b c"]), vec!["a".into(), "b c".into()]),
        (
            json!([1, 2, 3]),
            vec![EmbeddingInput::Tokens(vec![1, 2, 3])],
        ),
        (
            json!([[1, 2], [4294967295u64]]),
            vec![
                EmbeddingInput::Tokens(vec![1, 2]),
                EmbeddingInput::Tokens(vec![u32::MAX]),
            ],
        ),
    ];
    let mut calls = 0;
    let mut inputs = 0;
    for (input, want) in &forms {
        for format in [None, Some("float"), Some("base64")] {
            let mut body = json!({"model": "text-embedding-3-small", "input": input});
            if let Some(f) = format {
                body["encoding_format"] = json!(f);
            }
            let r = post_json(&c, format!("{}/v1/embeddings", fake.url()), &[], body).await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            assert_eq!(r.header("content-type"), "application/json");
            assert!(r.header("x-request-id").starts_with("req_fake_"));
            r.header("openai-processing-ms").parse::<u64>().unwrap();
            let j = r.json();
            assert_eq!(j["object"], "list");
            assert_eq!(j["model"], "text-embedding-3-small");
            let data = j["data"].as_array().unwrap();
            assert_eq!(data.len(), want.len());
            for (i, (item, input)) in data.iter().zip(want).enumerate() {
                assert_eq!(item["object"], "embedding");
                assert_eq!(item["index"], i);
                let is_b64 = item["embedding"].is_string();
                assert_eq!(is_b64, format == Some("base64"));
                let got = decode_embedding(&item["embedding"]).unwrap();
                assert_bits_eq(&got, &expected_embedding(input, 8));
            }
            let tokens: u32 = want
                .iter()
                .map(|i| billed_tokens("text-embedding-3-small", i))
                .sum();
            assert_eq!(j["usage"]["prompt_tokens"], tokens);
            assert_eq!(j["usage"]["total_tokens"], tokens);
            calls += 1;
            inputs += want.len();
        }
    }
    assert_eq!(fake.embedding_calls(), calls);
    assert_eq!(fake.embedding_inputs(), inputs);
    assert_eq!(fake.request_count(), calls);
}

#[tokio::test]
async fn dimensions_and_azure_deployment() {
    let fake = FakeUpstream::start_with(FakeOptions {
        dims: 5,
        ..FakeOptions::default()
    })
    .await;
    let c = client();
    let input = EmbeddingInput::from("x");
    let r = post_json(
        &c,
        format!("{}/v1/embeddings", fake.url()),
        &[],
        json!({"model": "m", "input": "x"}),
    )
    .await;
    let got = decode_embedding(&r.json()["data"][0]["embedding"]).unwrap();
    assert_bits_eq(&got, &expected_embedding(&input, 5));

    let r = post_json(
        &c,
        format!("{}/v1/embeddings", fake.url()),
        &[],
        json!({"model": "m", "input": "x", "dimensions": 256, "encoding_format": "base64"}),
    )
    .await;
    let got = decode_embedding(&r.json()["data"][0]["embedding"]).unwrap();
    assert_bits_eq(&got, &expected_embedding(&input, 256));

    let r = post_json(
        &c,
        format!(
            "{}/openai/deployments/my-embed/embeddings?api-version=2024-02-01",
            fake.url()
        ),
        &[],
        json!({"input": ["x"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["model"], "my-embed");
    assert_eq!(
        fake.requests()[2].uri.path_and_query().unwrap().as_str(),
        "/openai/deployments/my-embed/embeddings?api-version=2024-02-01"
    );
}

#[tokio::test]
async fn invalid_embeddings_requests_get_openai_400s() {
    let fake = FakeUpstream::start_with(FakeOptions {
        max_inputs: 3,
        max_input_tokens: 4,
        ..FakeOptions::default()
    })
    .await;
    let c = client();
    let url = format!("{}/v1/embeddings", fake.url());
    let bad: Vec<Bytes> = vec![
        Bytes::from_static(b"{not json"),
        Bytes::from_static(b"[1,2]"),
        json!({"model": "m"}).to_string().into(),
        json!({"model": "m", "input": ""}).to_string().into(),
        json!({"model": "m", "input": []}).to_string().into(),
        json!({"model": "m", "input": ["a", ""]}).to_string().into(),
        json!({"model": "m", "input": ["a", 1]}).to_string().into(),
        json!({"model": "m", "input": [-1]}).to_string().into(),
        json!({"model": "m", "input": [1.5]}).to_string().into(),
        json!({"model": "m", "input": [[1], []]}).to_string().into(),
        json!({"model": "m", "input": 7}).to_string().into(),
        json!({"input": "a"}).to_string().into(),
        json!({"model": "m", "input": "a", "encoding_format": "int8"})
            .to_string()
            .into(),
        json!({"model": "m", "input": "a", "dimensions": 0})
            .to_string()
            .into(),
        json!({"model": "m", "input": ["a", "b", "c", "d"]})
            .to_string()
            .into(),
        json!({"model": "m", "input": ["ok", "one two three four five"]})
            .to_string()
            .into(),
    ];
    for body in bad {
        let r = send(
            &c,
            Method::POST,
            url.clone(),
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}");
        let err = &r.json()["error"];
        assert_eq!(err["type"], "invalid_request_error", "{body:?}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(err.get("param").is_some() && err.get("code").is_some());
    }
    assert_eq!(fake.embedding_calls(), 0);
    // At the limits it is fine.
    let r = post_json(
        &c,
        url,
        &[],
        json!({"model": "m", "input": ["a", "b", "one two three four"], "user": "u", "new_param": 1}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Reads SSE `data:` payloads as they arrive, with the time each frame arrived.
async fn read_events(
    body: &mut hyper::body::Incoming,
    buf: &mut String,
    until: usize,
    events: &mut Vec<(Instant, String)>,
) {
    while events.len() < until {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("next SSE frame in time")
            .expect("stream not ended")
            .expect("frame ok");
        if let Ok(data) = frame.into_data() {
            buf.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let payload = event.trim_end().strip_prefix("data: ").unwrap().to_string();
                events.push((Instant::now(), payload));
            }
        }
    }
}

#[tokio::test]
async fn chat_stream_arrives_chunk_by_chunk_and_can_be_held() {
    let fake = FakeUpstream::start_with(FakeOptions {
        stream_chunks: 4,
        stream_interval: Duration::from_millis(40),
        ..FakeOptions::default()
    })
    .await;
    let c = client();
    fake.hold_streams(true);
    let req = Request::post(format!("{}/v1/chat/completions", fake.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let (mut buf, mut events) = (String::new(), Vec::new());
    read_events(&mut body, &mut buf, 3, &mut events).await;
    // Real streaming: the chunks came spread over time, not in one burst at the end.
    assert!(events[2].0 - events[0].0 >= Duration::from_millis(60));
    // Held: the last chunk does not come...
    let next = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
    assert!(next.is_err(), "stream should be held before its last chunk");
    assert_eq!(fake.in_flight(), 1);
    // ...until released.
    fake.release_streams();
    read_events(&mut body, &mut buf, 5, &mut events).await;
    assert!(body.frame().await.is_none(), "stream ends after [DONE]");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 ");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert!(chunks[2]["choices"][0]["finish_reason"].is_null());
    assert_eq!(events[4].1, "[DONE]");
    assert!(
        fake.wait_until(Duration::from_secs(2), |f| f.in_flight() == 0)
            .await
    );

    // A release issued before a stream reaches its last chunk still lets it through.
    let req = Request::post(format!("{}/v1/chat/completions", fake.url()))
        .body(Full::new(Bytes::from(
            json!({"model": "m", "stream": true, "messages": []}).to_string(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    fake.release_streams();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));

    // Non-streaming: the same deltas, concatenated.
    let r = post_json(
        &c,
        format!("{}/v1/chat/completions", fake.url()),
        &[],
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b"}]}),
    )
    .await;
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(
        j["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 "
    );
    assert_eq!(j["usage"]["prompt_tokens"], 2);
}

#[tokio::test]
async fn echo_preserves_method_path_query_and_body() {
    let fake = FakeUpstream::start().await;
    let c = client();
    let r = send(
        &c,
        Method::PUT,
        format!("{}/v1/files/abc?purpose=x&y=%20z", fake.url()),
        &[("content-type", "text/plain"), ("x-custom", "1")],
        "hello echo",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"hello echo");
    assert_eq!(r.header("content-type"), "text/plain");
    assert_eq!(r.header("x-fake-method"), "PUT");
    assert_eq!(r.header("x-fake-path"), "/v1/files/abc?purpose=x&y=%20z");
    let r = send(&c, Method::DELETE, format!("{}/x", fake.url()), &[], "").await;
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert!(r.body.is_empty());

    let recs = fake.requests();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].method, Method::PUT);
    assert_eq!(recs[0].path(), "/v1/files/abc");
    assert_eq!(recs[0].uri.query(), Some("purpose=x&y=%20z"));
    assert_eq!(recs[0].header("x-custom"), Some("1"));
    assert_eq!(&recs[0].body[..], b"hello echo");
    assert!(recs[0].body_complete && recs[1].body_complete);
    assert_eq!(recs[0].version, Version::HTTP_11);
    assert_eq!(recs[1].method, Method::DELETE);

    fake.reset_stats();
    assert_eq!(fake.request_count(), 0);
    assert!(fake.requests().is_empty());
    assert_eq!(fake.body_bytes_received(), 0);
}

#[tokio::test]
async fn echo_streams_the_body_back_as_it_arrives() {
    let fake = FakeUpstream::start().await;
    let mut s = TcpStream::connect(fake.addr()).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n6\r\npart-1\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("part-1") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("echo of the first part before the body ended")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"6\r\npart-2\r\n0\r\n\r\n").await.unwrap();
    while !String::from_utf8_lossy(&got).contains("0\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("part-2"));
    assert_eq!(&fake.requests()[0].body[..], b"part-1part-2");
}

#[tokio::test]
async fn header_overrides_rules_and_default_behaviour() {
    let fake = FakeUpstream::start().await;
    let c = client();
    let emb = format!("{}/v1/embeddings", fake.url());
    let body = json!({"model": "m", "input": "x"});

    // x-fake-status with retry-after.
    let r = post_json(
        &c,
        emb.clone(),
        &[("x-fake-status", "429"), ("x-fake-retry-after", "3")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), "3");
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(r.json()["error"]["param"].is_null());
    assert_eq!(fake.embedding_calls(), 0);

    // x-fake-delay-ms.
    let t = Instant::now();
    let r = post_json(&c, emb.clone(), &[("x-fake-delay-ms", "150")], body.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(150));

    // x-fake-times scoped by x-fake-key: fail twice, then succeed.
    let h = [
        ("x-fake-status", "503"),
        ("x-fake-times", "2"),
        ("x-fake-key", "k1"),
    ];
    let statuses: Vec<u16> = futures_util::future::join_all(
        (0..3).map(|_| post_json(&c, emb.clone(), &h, body.clone())),
    )
    .await
    .iter()
    .map(|r| r.status.as_u16())
    .collect();
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, [200, 503, 503]);

    // x-fake-header adds reply headers; malformed is 200 with broken JSON.
    let r = post_json(
        &c,
        emb.clone(),
        &[("x-fake-header", "x-ratelimit-remaining-requests: 0")],
        body.clone(),
    )
    .await;
    assert_eq!(r.header("x-ratelimit-remaining-requests"), "0");
    let r = post_json(&c, emb.clone(), &[("x-fake-malformed", "1")], body.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());

    // Rules: path-scoped, consumed in order, skipped (not consumed) by other paths.
    fake.push_rule(Rule::repeat(Behavior::openai_error(500), 2).on_path("/embeddings"));
    fake.push_rule(Rule::once(
        Behavior::openai_error(502).with_header("x-extra", "y"),
    ));
    let models = format!("{}/v1/models", fake.url());
    let r = send(&c, Method::GET, models.clone(), &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.header("x-extra"), "y");
    let r = send(&c, Method::GET, models.clone(), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["data"][0]["object"], "model");
    assert_eq!(fake.pending_rules().len(), 1);
    // Headers win over rules (and do not consume them).
    let r = post_json(&c, emb.clone(), &[("x-fake-status", "418")], body.clone()).await;
    assert_eq!(r.status.as_u16(), 418);
    for want in [500, 500, 200] {
        let r = post_json(&c, emb.clone(), &[], body.clone()).await;
        assert_eq!(r.status.as_u16(), want);
    }

    // Default behaviour, and headers winning over it.
    fake.set_behavior(Behavior::Status {
        status: 503,
        headers: vec![("retry-after".into(), "1".into())],
        body: "{\"error\":{\"message\":\"busy\",\"type\":\"server_error\",\"param\":null,\"code\":null}}".into(),
    });
    let r = post_json(&c, emb.clone(), &[], body.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("content-type"), "application/json");
    let r = post_json(&c, emb.clone(), &[("x-fake-delay-ms", "0")], body.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    fake.set_behavior(Behavior::Normal.with_header("x-ratelimit-remaining-tokens", "0"));
    let r = post_json(&c, emb, &[], body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), "0");
}

async fn read_to_end_or_reset(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("connection closed in time");
    got
}

#[tokio::test]
async fn drop_closes_the_connection_without_a_response() {
    let fake = FakeUpstream::start().await;
    let mut s = TcpStream::connect(fake.addr()).await.unwrap();
    s.write_all(
        b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nx-fake-drop: 1\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    assert!(read_to_end_or_reset(&mut s).await.is_empty());
    let recs = fake.requests();
    assert_eq!(recs.len(), 1, "dropped requests are recorded too");
    assert_eq!(&recs[0].body[..], b"{}");

    // Through the default behaviour, a hyper client sees an error.
    fake.set_behavior(Behavior::Drop);
    let r = client()
        .request(
            Request::get(format!("{}/v1/models", fake.url()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(r.is_err());
    assert!(
        fake.wait_until(Duration::from_secs(2), |f| f.in_flight() == 0)
            .await
    );
}

#[tokio::test]
async fn hang_ends_when_the_client_leaves_or_the_fake_is_dropped() {
    let fake = FakeUpstream::start().await;
    let req = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-fake-hang: 1\r\n\r\n";
    let mut s = TcpStream::connect(fake.addr()).await.unwrap();
    s.write_all(req).await.unwrap();
    assert!(
        fake.wait_until(Duration::from_secs(2), |f| f.in_flight() == 1)
            .await
    );
    drop(s);
    assert!(
        fake.wait_until(Duration::from_secs(2), |f| f.in_flight() == 0)
            .await,
        "the hanging handler is dropped when the client goes away"
    );
    assert_eq!(
        fake.requests().len(),
        1,
        "hanging requests are recorded too"
    );

    // Dropping the fake closes connections with hanging requests.
    let mut s = TcpStream::connect(fake.addr()).await.unwrap();
    s.write_all(req).await.unwrap();
    assert!(
        fake.wait_until(Duration::from_secs(2), |f| f.in_flight() == 1)
            .await
    );
    let addr = fake.addr();
    drop(fake);
    assert!(read_to_end_or_reset(&mut s).await.is_empty());
    // And stops listening.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn max_connections_caps_concurrency() {
    let fake = FakeUpstream::start_with(FakeOptions {
        max_connections: Some(2),
        ..FakeOptions::default()
    })
    .await;
    fake.set_behavior(Behavior::Delay(Duration::from_millis(100)));
    // No idle pooling: each connection closes after its response, freeing a slot.
    let c: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let url = format!("{}/v1/models", fake.url());
    let replies =
        futures_util::future::join_all((0..6).map(|_| send(&c, Method::GET, url.clone(), &[], "")))
            .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(fake.peak_concurrency(), 2);
    assert_eq!(fake.request_count(), 6);

    // Without the cap, the same load runs all at once.
    let open = FakeUpstream::start().await;
    open.set_behavior(Behavior::Delay(Duration::from_millis(100)));
    let url = format!("{}/v1/models", open.url());
    futures_util::future::join_all((0..6).map(|_| send(&c, Method::GET, url.clone(), &[], "")))
        .await;
    assert_eq!(open.peak_concurrency(), 6);
}

#[tokio::test]
async fn body_bytes_are_counted_as_they_arrive() {
    let fake = FakeUpstream::start().await;
    let mut s = TcpStream::connect(fake.addr()).await.unwrap();
    let first = b"{\"model\":\"m\",";
    let rest = b"\"input\":\"hi\"}";
    s.write_all(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    s.write_all(format!("{:x}\r\n", first.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(first).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    assert!(
        fake.wait_until(Duration::from_secs(2), |f| f.body_bytes_received()
            == first.len() as u64)
            .await,
        "the first chunk is counted before the body ends"
    );
    assert_eq!(fake.embedding_calls(), 0);
    assert!(!fake.requests()[0].body_complete);
    s.write_all(format!("{:x}\r\n", rest.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(rest).await.unwrap();
    s.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let reply = String::from_utf8(read_to_end_or_reset(&mut s).await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert_eq!(
        fake.body_bytes_received(),
        (first.len() + rest.len()) as u64
    );
    assert_eq!(fake.embedding_calls(), 1);
    assert!(fake.requests()[0].body_complete);
}

#[tokio::test]
async fn serves_h2c() {
    let fake = FakeUpstream::start().await;
    let c: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let r = post_json(
        &c,
        format!("{}/v1/embeddings", fake.url()),
        &[],
        json!({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let got = decode_embedding(&r.json()["data"][1]["embedding"]).unwrap();
    assert_bits_eq(&got, &expected_embedding(&"b".into(), 8));
    let rec = &fake.requests()[0];
    assert_eq!(rec.version, Version::HTTP_2);
    assert_eq!(rec.uri, "/v1/embeddings", "origin form, as for HTTP/1.1");
    assert_eq!(
        rec.authority.as_ref().unwrap().as_str(),
        fake.addr().to_string()
    );
}

#[tokio::test(start_paused = true)]
async fn delays_follow_tokio_paused_time() {
    let fake = FakeUpstream::start().await;
    fake.set_behavior(Behavior::Delay(Duration::from_secs(600)));
    let real = Instant::now();
    let r = send(
        &client(),
        Method::GET,
        format!("{}/v1/models", fake.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(real.elapsed() < Duration::from_secs(10));
    assert!(
        fake.wait_until(Duration::from_secs(2), |f| f.in_flight() == 0)
            .await
    );
}
