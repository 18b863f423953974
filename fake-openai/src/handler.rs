//! One request: its route, its plan (header override, rule, default behaviour, random fault,
//! capacity), then the endpoint's reply or the one the plan forces; and the fake's own control
//! plane under [`CONTROL_PREFIX`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::json;

use crate::behavior::Action;
use crate::replies::{chat, echo, embeddings, json_response, models, openai_error_body};
use crate::server::{empty, full, FakeBody, FakeError, InFlight, InnerBody, Shared, Slot};
use crate::{OverCapacity, CONTROL_PREFIX};

#[derive(Debug, PartialEq)]
enum Route {
    Embeddings { deployment: Option<String> },
    Chat { deployment: Option<String> },
    Models,
    Echo,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        let azure = |suffix: &str| {
            path.strip_prefix("/openai/deployments/")
                .and_then(|rest| rest.strip_suffix(suffix))
                .filter(|d| !d.is_empty() && !d.contains('/'))
                .map(str::to_string)
        };
        if method == Method::POST {
            if path == "/v1/embeddings" {
                return Route::Embeddings { deployment: None };
            }
            if let Some(d) = azure("/embeddings") {
                return Route::Embeddings {
                    deployment: Some(d),
                };
            }
            if path == "/v1/chat/completions" {
                return Route::Chat { deployment: None };
            }
            if let Some(d) = azure("/chat/completions") {
                return Route::Chat {
                    deployment: Some(d),
                };
            }
        }
        if method == Method::GET && path == "/v1/models" {
            return Route::Models;
        }
        Route::Echo
    }
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<FakeBody>, FakeError> {
    if req.uri().path().starts_with(CONTROL_PREFIX) {
        return Ok(control(&shared, &req).map(|inner| FakeBody { inner, guard: None }));
    }
    let guard = InFlight::enter(shared.clone());
    let started = Instant::now();
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    let request_id = shared.next_request_id();
    let (parts, body) = req.into_parts();
    let slot = shared.record_head(&parts);
    let mut plan = shared.plan_for(&parts);
    let route = Route::of(&parts.method, parts.uri.path());
    let is_embeddings = matches!(route, Route::Embeddings { .. });
    if is_embeddings && matches!(plan.action, Action::Normal) && !shared.opts.faults.is_empty() {
        if let Some(fault) = shared.opts.faults.pick(shared.next_draw()) {
            plan.action = fault;
        }
    }
    // A worker for the call, held until its answer is written (or it is dropped).
    let _worker = match (&shared.workers, is_embeddings) {
        (Some(workers), true) => match workers.clone().try_acquire_owned() {
            Ok(w) => Some(w),
            Err(_) if shared.opts.over_capacity == OverCapacity::Refuse => {
                shared.over_capacity_refused.fetch_add(1, Ordering::SeqCst);
                let body = openai_error_body("Model is overloaded", "overloaded", None, None);
                return Ok(
                    json_response(StatusCode::TOO_MANY_REQUESTS, body).map(|inner| FakeBody {
                        inner,
                        guard: Some(guard),
                    }),
                );
            }
            Err(_) => {
                shared.over_capacity_queued.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    w = workers.clone().acquire_owned() => w.ok(),
                    _ = shared.shutdown() => return Err(FakeError::new("shutting down")),
                }
            }
        },
        _ => None,
    };

    let mut resp = match plan.action {
        // The echo streams: it must not wait for the whole body.
        Action::Normal if route == Route::Echo => {
            delay(&shared, plan.delay).await?;
            echo(&shared, &parts, body, slot)
        }
        action => {
            let body = read_body(&shared, body, slot).await?;
            delay(&shared, plan.delay).await?;
            match action {
                Action::Normal => match route {
                    Route::Embeddings { deployment } => {
                        embeddings(&shared, &body, deployment.as_deref())
                    }
                    Route::Chat { deployment } => {
                        chat(&shared, &body, deployment.as_deref(), &request_id)
                    }
                    Route::Models => models(),
                    Route::Echo => unreachable!("handled above"),
                },
                Action::Status {
                    status,
                    headers,
                    body,
                } => {
                    let mut resp = Response::new(full(body.clone()));
                    *resp.status_mut() =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    add_headers(resp.headers_mut(), &headers);
                    if !body.is_empty() && !resp.headers().contains_key(CONTENT_TYPE) {
                        resp.headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    }
                    resp
                }
                Action::Hang => {
                    shared.shutdown().await;
                    return Err(FakeError::new("shutting down"));
                }
                Action::Drop => return Err(FakeError::new("dropping the connection")),
                Action::Malformed => json_response(
                    StatusCode::OK,
                    &b"{\"object\":\"list\",\"data\":[{\"object\":\"embedding\",\"index\":0,\"embedding\":[0.0123,-0.45"[..],
                ),
                Action::Cut => {
                    // The head and a first part go out; a moment later the reply breaks, so the
                    // client sees a body cut off, not a connection closed before any reply.
                    let frames = futures_util::stream::unfold(0u8, |step| async move {
                        match step {
                            0 => Some((
                                Ok(Frame::data(Bytes::from_static(
                                    b"{\"object\":\"list\",\"data\":[{",
                                ))),
                                1,
                            )),
                            1 => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Some((Err(FakeError::new("cutting the reply off")), 2))
                            }
                            _ => None,
                        }
                    });
                    let mut resp = Response::new(UnsyncBoxBody::new(StreamBody::new(frames)));
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    resp
                }
            }
        }
    };
    add_headers(resp.headers_mut(), &plan.extra_headers);
    let h = resp.headers_mut();
    // A rule's explicit x-request-id wins.
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.entry("x-request-id").or_insert(v);
    }
    h.insert(
        "openai-processing-ms",
        HeaderValue::from(started.elapsed().as_millis() as u64),
    );
    Ok(resp.map(|inner| FakeBody {
        inner,
        guard: Some(guard),
    }))
}

async fn delay(shared: &Shared, d: Option<Duration>) -> Result<(), FakeError> {
    if let Some(d) = d {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shared.shutdown() => return Err(FakeError::new("shutting down")),
        }
    }
    Ok(())
}

fn add_headers(h: &mut HeaderMap, pairs: &[(String, String)]) {
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
}

/// Reads the whole body, counting bytes frame by frame as they arrive, and records it.
async fn read_body(
    shared: &Shared,
    mut body: Incoming,
    slot: Option<Slot>,
) -> Result<Bytes, FakeError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let joined = |chunks: &mut Vec<Bytes>| -> Bytes {
        match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
                chunks.iter().for_each(|c| b.extend_from_slice(c));
                b.freeze()
            }
        }
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    shared.count_body_bytes(data.len());
                    chunks.push(data);
                }
            }
            Err(e) => {
                shared.record_body(slot, joined(&mut chunks), false);
                return Err(e.into());
            }
        }
    }
    let body = joined(&mut chunks);
    shared.record_body(slot, body.clone(), true);
    Ok(body)
}

fn control(shared: &Shared, req: &Request<Incoming>) -> Response<InnerBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/__fake/stats") => {
            let stats = json!({
                "requests": shared.request_count.load(Ordering::SeqCst),
                "in_flight": shared.in_flight.load(Ordering::SeqCst),
                "peak_concurrency": shared.peak.load(Ordering::SeqCst),
                "body_bytes_received": shared.body_bytes.load(Ordering::SeqCst),
                "embedding_calls": shared.embedding_calls.load(Ordering::SeqCst),
                "embedding_inputs": shared.embedding_inputs.load(Ordering::SeqCst),
                "over_capacity_refused": shared.over_capacity_refused.load(Ordering::SeqCst),
                "over_capacity_queued": shared.over_capacity_queued.load(Ordering::SeqCst),
            });
            json_response(StatusCode::OK, serde_json::to_vec(&stats).expect("json"))
        }
        (&Method::POST, "/__fake/reset") => {
            shared.reset_stats();
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            openai_error_body(
                "unknown fake control endpoint",
                "invalid_request_error",
                None,
                None,
            ),
        ),
    }
}
