//! The endpoints' replies: OpenAI's error shapes, the echo, the model list, embeddings, and plain
//! and streamed chat completions.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::embedding::{
    base64_encode, billed_tokens, expected_embedding, fake_token_count, parse_embedding_input,
};
use crate::server::{full, FakeError, InnerBody, Shared, Slot, StreamGate};

pub(crate) fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<InnerBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(crate) fn openai_error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "error": { "message": message, "type": kind, "param": param, "code": code }
    }))
    .expect("serialize error")
}

fn invalid_request(message: &str, param: Option<&str>) -> Response<InnerBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        openai_error_body(message, "invalid_request_error", param, None),
    )
}

/// The error body of a forced status, with the `type`/`code` OpenAI uses for it.
pub(crate) fn forced_error_body(status: u16) -> Vec<u8> {
    let (kind, code, what) = match status {
        400 => ("invalid_request_error", None, "Bad request"),
        401 => (
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided",
        ),
        403 => ("permission_error", None, "Forbidden"),
        404 => ("invalid_request_error", None, "Not found"),
        408 => ("timeout", None, "Request timed out"),
        409 => ("conflict", None, "Conflict"),
        429 => (
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached. Please try again later.",
        ),
        503 => (
            "server_error",
            None,
            "The engine is currently overloaded, please try again later",
        ),
        s if s >= 500 => (
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
        _ => ("invalid_request_error", None, "Forced status"),
    };
    openai_error_body(
        &format!("{what} (fake upstream: forced status {status})"),
        kind,
        None,
        code,
    )
}

// --- echo ----------------------------------------------------------------------------------------

pub(crate) fn echo(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: Incoming,
    slot: Option<Slot>,
) -> Response<InnerBody> {
    let body = EchoBody {
        inner: body,
        shared: shared.clone(),
        slot,
        seen: Vec::new(),
        done: false,
    };
    let mut resp = Response::new(body.boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        parts
            .headers
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(parts.method.as_str()) {
        h.insert("x-fake-method", v);
    }
    let pq = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    if let Ok(v) = HeaderValue::from_str(pq) {
        h.insert("x-fake-path", v);
    }
    resp
}

/// Streams the request body back frame by frame (trailers included), counting and recording
/// what passes through.
struct EchoBody {
    inner: Incoming,
    shared: Arc<Shared>,
    slot: Option<Slot>,
    seen: Vec<Bytes>,
    done: bool,
}

impl EchoBody {
    fn finish(&mut self, complete: bool) {
        self.done = true;
        if self.slot.is_some() {
            let mut b = BytesMut::with_capacity(self.seen.iter().map(Bytes::len).sum());
            self.seen.drain(..).for_each(|c| b.extend_from_slice(&c));
            self.shared.record_body(self.slot, b.freeze(), complete);
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = FakeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FakeError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.shared.count_body_bytes(data.len());
                    if this.slot.is_some() {
                        this.seen.push(data.clone());
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EchoBody {
    fn drop(&mut self) {
        if !self.done {
            // An empty body may never be polled: hyper sees is_end_stream() and drops it.
            let complete = self.inner.is_end_stream();
            self.finish(complete);
        }
    }
}

// --- models ----------------------------------------------------------------------------------

pub(crate) fn models() -> Response<InnerBody> {
    let ids = [
        "text-embedding-3-small",
        "text-embedding-3-large",
        "text-embedding-ada-002",
        "gpt-4o-mini",
    ];
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1, "owned_by": "openai"}))
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&json!({"object": "list", "data": data})).expect("json"),
    )
}

// --- embeddings ------------------------------------------------------------------------------

/// f32 (not f64) so serde_json writes the shortest text that parses back to the same f32.
enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

/// The embeddings reply, its envelope written by hand: a base64 vector is kilobytes of text
/// that needs no escaping, and serde_json's escape scan over it was a tenth of the benchmark
/// core. Floats, the model name and the usage still go through serde_json.
fn embeddings_body(values: Vec<EmbeddingValue>, model: &str, usage: &EmbeddingUsage) -> Vec<u8> {
    let room: usize = values
        .iter()
        .map(|v| match v {
            EmbeddingValue::Float(f) => f.len() * 12,
            EmbeddingValue::Base64(s) => s.len(),
        })
        .sum();
    let mut out = Vec::with_capacity(room + 64 * values.len() + 128);
    out.extend_from_slice(br#"{"object":"list","data":["#);
    for (index, value) in values.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write!(
            out,
            r#"{{"object":"embedding","index":{index},"embedding":"#
        )
        .expect("write to a Vec");
        match value {
            EmbeddingValue::Float(v) => serde_json::to_writer(&mut out, &v).expect("f32 JSON"),
            EmbeddingValue::Base64(s) => {
                out.push(b'"');
                out.extend_from_slice(s.as_bytes());
                out.push(b'"');
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"model":"#);
    serde_json::to_writer(&mut out, model).expect("a string is JSON");
    out.extend_from_slice(br#","usage":"#);
    serde_json::to_writer(&mut out, usage).expect("usage is JSON");
    out.push(b'}');
    out
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

pub(crate) fn embeddings(
    shared: &Shared,
    body: &[u8],
    deployment: Option<&str>,
) -> Response<InnerBody> {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return invalid_request("The request body must be a JSON object.", None),
        Err(e) => {
            return invalid_request(
                &format!("We could not parse the JSON body of your request. ({e})"),
                None,
            )
        }
    };
    let model = match (req.get("model"), deployment) {
        (Some(Value::String(m)), _) => m.as_str(),
        (None | Some(Value::Null), Some(d)) => d,
        (None | Some(Value::Null), None) => {
            return invalid_request("you must provide a model parameter", Some("model"))
        }
        _ => return invalid_request("'$.model' is invalid.", Some("model")),
    };
    let inputs = match req.get("input") {
        None | Some(Value::Null) => {
            return invalid_request("'input' is a required property", Some("input"))
        }
        Some(v) => match parse_embedding_input(v) {
            Ok(i) => i,
            Err(msg) => return invalid_request(&msg, Some("input")),
        },
    };
    let base64 = match req.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        _ => {
            return invalid_request(
                "'$.encoding_format' is invalid: expected 'float' or 'base64'.",
                Some("encoding_format"),
            )
        }
    };
    let dims = match req.get("dimensions") {
        None | Some(Value::Null) => shared.opts.dims,
        Some(v) => match v.as_u64().filter(|d| (1..=65_536).contains(d)) {
            Some(d) => d as usize,
            None => return invalid_request("'$.dimensions' is invalid.", Some("dimensions")),
        },
    };
    let o = &shared.opts;
    if inputs.len() > o.max_inputs {
        return invalid_request(
            &format!(
                "'$.input' is invalid: {} inputs given, the maximum is {}.",
                inputs.len(),
                o.max_inputs
            ),
            Some("input"),
        );
    }
    let counts: Vec<u64> = inputs
        .iter()
        .map(|i| match o.exact_usage {
            true => u64::from(billed_tokens(model, i)),
            false => u64::from(fake_token_count(i)),
        })
        .collect();
    if let Some(n) = counts.iter().find(|n| **n > o.max_input_tokens as u64) {
        return invalid_request(
            &format!(
                "This model's maximum context length is {} tokens, however you requested {n} tokens ({n} in your prompt; 0 for the completion). Please reduce your prompt; or completion length.",
                o.max_input_tokens
            ),
            None,
        );
    }
    let tokens: u64 = counts.iter().sum();
    if tokens > o.max_request_tokens as u64 {
        return invalid_request(
            &format!(
                "Requested {tokens} tokens, max {} tokens per request",
                o.max_request_tokens
            ),
            None,
        );
    }

    let values = inputs
        .iter()
        .map(|input| {
            let v = expected_embedding(input, dims);
            if base64 {
                // A plain loop: the benchmarks run this fake on one core beside the load
                // generator, and an iterator chain here was a sixth of that core.
                let mut bytes = Vec::with_capacity(v.len() * 4);
                for f in &v {
                    bytes.extend_from_slice(&f.to_le_bytes());
                }
                EmbeddingValue::Base64(base64_encode(&bytes))
            } else {
                EmbeddingValue::Float(v)
            }
        })
        .collect();
    let usage = EmbeddingUsage {
        prompt_tokens: tokens,
        total_tokens: tokens,
    };
    let body = embeddings_body(values, model, &usage);
    shared.embedding_calls.fetch_add(1, Ordering::SeqCst);
    shared
        .embedding_inputs
        .fetch_add(inputs.len(), Ordering::SeqCst);
    let mut resp = json_response(StatusCode::OK, body);
    if let Ok(v) = HeaderValue::from_str(model) {
        resp.headers_mut().insert("openai-model", v);
    }
    resp.headers_mut()
        .insert("openai-version", HeaderValue::from_static("2020-10-01"));
    resp
}

// --- chat ------------------------------------------------------------------------------------

pub(crate) fn chat(
    shared: &Arc<Shared>,
    body: &[u8],
    deployment: Option<&str>,
    request_id: &str,
) -> Response<InnerBody> {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return invalid_request("We could not parse the JSON body of your request.", None),
    };
    let model = match (req.get("model").and_then(Value::as_str), deployment) {
        (Some(m), _) => m.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            return invalid_request("you must provide a model parameter", Some("model"))
        }
    };
    let prompt_tokens = req
        .get("messages")
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(|c| c.split_whitespace().count() as u64)
                .sum::<u64>()
        })
        .unwrap_or(0)
        .max(1);
    let n = shared.opts.stream_chunks;
    let id = format!(
        "chatcmpl-fake-{}",
        request_id.trim_start_matches("req_fake_")
    );
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let content: String = (0..n).map(|i| format!("tok{i} ")).collect();
        let reply = json!({
            "id": id,
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n as u64
            },
            "system_fingerprint": null
        });
        return json_response(StatusCode::OK, serde_json::to_vec(&reply).expect("json"));
    }
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let sse = SseState {
        shared: shared.clone(),
        gate: shared.streams.subscribe(),
        started_generation: shared.streams.borrow().generation,
        id,
        model,
        next: 0,
        n,
        interval: shared.opts.stream_interval,
        include_usage,
        prompt_tokens,
        finished: false,
    };
    let stream = futures_util::stream::unfold(sse, |mut st| async move {
        let item = st.next_event().await?;
        Some((item, st))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

/// State of one streamed chat reply. Events: chunk 0..n (each `interval` apart; the last one
/// waits for the hold gate), an optional usage chunk, then `[DONE]`.
struct SseState {
    shared: Arc<Shared>,
    gate: watch::Receiver<StreamGate>,
    started_generation: u64,
    id: String,
    model: String,
    next: usize,
    n: usize,
    interval: Duration,
    include_usage: bool,
    prompt_tokens: u64,
    finished: bool,
}

impl SseState {
    async fn next_event(&mut self) -> Option<Result<Frame<Bytes>, FakeError>> {
        if self.finished {
            return None;
        }
        let k = self.next;
        self.next += 1;
        if k < self.n {
            if k > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = self.shared.shutdown() => return self.abort(),
                }
            }
            if k == self.n - 1 {
                let since = self.started_generation;
                let released = tokio::select! {
                    r = self.gate.wait_for(|g| !g.hold || g.generation > since) => r.is_ok(),
                    _ = self.shared.shutdown() => false,
                };
                if !released {
                    return self.abort();
                }
            }
            let last = k == self.n - 1;
            let chunk = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": 1,
                "model": self.model,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "delta": if k == 0 {
                        json!({"role": "assistant", "content": format!("tok{k} ")})
                    } else {
                        json!({"content": format!("tok{k} ")})
                    },
                    "logprobs": null,
                    "finish_reason": if last { json!("stop") } else { Value::Null }
                }]
            });
            return Some(Ok(sse_data(&chunk.to_string())));
        }
        if k == self.n && self.include_usage {
            let chunk = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": 1,
                "model": self.model,
                "system_fingerprint": null,
                "choices": [],
                "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.n,
                    "total_tokens": self.prompt_tokens + self.n as u64
                }
            });
            return Some(Ok(sse_data(&chunk.to_string())));
        }
        self.finished = true;
        Some(Ok(sse_data("[DONE]")))
    }

    fn abort(&mut self) -> Option<Result<Frame<Bytes>, FakeError>> {
        self.finished = true;
        Some(Err(FakeError::new("shutting down")))
    }
}

fn sse_data(payload: &str) -> Frame<Bytes> {
    let mut b = BytesMut::with_capacity(payload.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(payload.as_bytes());
    b.extend_from_slice(b"\n\n");
    Frame::data(b.freeze())
}
