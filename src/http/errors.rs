//! The one error type for failures embedcar itself answers, and the one place that maps each to
//! an HTTP status and OpenAI's error shape.
//!
//! Errors the upstream returns are not in here: those reach the caller untouched (status,
//! headers, body). These are the replies embedcar makes on its own, shaped like OpenAI's so that
//! the official clients raise the usual exception types with a readable message. A message never
//! contains a credential or a request body.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::{
    config::durations::Human,
    http::body::{BoxError, ProxyBody},
};

/// Response header naming the embedcar error code, so that a caller (or an operator reading a
/// trace) can tell embedcar's own replies from the upstream's.
pub const ERROR_HEADER: &str = "x-embedcar-error";

/// Retry-After on failures of the upstream or of a deadline: soon, but not at once.
pub const UPSTREAM_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },

    #[error("the request body stalled for longer than {}", Human(*.0))]
    ClientBodyTimeout(Duration),

    #[error(
        "all {max_concurrency} upstream request slots stayed busy for {}; retry later", Human(*waited)
    )]
    Overloaded {
        max_concurrency: usize,
        waited: Duration,
        retry_after: Duration,
    },

    #[error("embedcar is shutting down")]
    ShuttingDown,

    #[error("the rate limit for this credential would not let the request through before its deadline; retry after {}", Human(*retry_after))]
    RateLimited { retry_after: Duration },

    #[error("the upstream is failing; embedcar stopped sending to it for a while; retry after {}", Human(*retry_after))]
    CircuitOpen { retry_after: Duration },

    #[error("too many requests are queued in embedcar; retry later")]
    QueueFull { retry_after: Duration },

    #[error("embedcar holds as many request bodies in memory as it may; retry later")]
    BuffersFull { retry_after: Duration },

    #[error("the upstream did not answer within {}", Human(*.0))]
    UpstreamTimeout(Duration),

    #[error("could not reach the upstream: {0}")]
    UpstreamUnreachable(String),

    #[error("the upstream sent a reply embedcar cannot use: {0}")]
    UpstreamInvalidReply(String),

    #[error("the request did not complete within its deadline of {}", Human(*.0))]
    DeadlineExceeded(Duration),

    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },

    #[error("internal error in embedcar: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The one mapping from error to status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overloaded { .. }
            | ProxyError::ShuttingDown
            | ProxyError::CircuitOpen { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::BuffersFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamInvalidReply(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code` for this error. Types follow OpenAI's vocabulary where one
    /// fits (`invalid_request_error`, `server_error`); codes are embedcar's own and stable.
    pub fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ProxyError::BodyTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            ProxyError::ClientBodyTimeout(_) => ("invalid_request_error", "request_body_timeout"),
            ProxyError::Overloaded { .. } => ("server_error", "proxy_overloaded"),
            ProxyError::ShuttingDown => ("server_error", "proxy_shutting_down"),
            ProxyError::RateLimited { .. } => ("requests", "rate_limited"),
            ProxyError::CircuitOpen { .. } => ("server_error", "upstream_circuit_open"),
            ProxyError::QueueFull { .. } => ("server_error", "queue_full"),
            ProxyError::BuffersFull { .. } => ("server_error", "request_buffers_full"),
            ProxyError::UpstreamTimeout(_) => ("server_error", "upstream_timeout"),
            ProxyError::UpstreamUnreachable(_) => ("server_error", "upstream_unreachable"),
            ProxyError::UpstreamInvalidReply(_) => ("server_error", "upstream_invalid_reply"),
            ProxyError::DeadlineExceeded(_) => ("server_error", "deadline_exceeded"),
            ProxyError::InvalidRequest { .. } => ("invalid_request_error", "invalid_request"),
            ProxyError::Internal(_) => ("server_error", "internal_error"),
        }
    }

    /// When the caller should come back, for the statuses where waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::Overloaded { retry_after, .. }
            | ProxyError::RateLimited { retry_after }
            | ProxyError::CircuitOpen { retry_after }
            | ProxyError::QueueFull { retry_after }
            | ProxyError::BuffersFull { retry_after } => Some(*retry_after),
            // Worth a retry soon: the upstream (or its link) failing, or a deadline missed under
            // load. Also keeps a client that honours Retry-After from retrying at once.
            ProxyError::ShuttingDown
            | ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamInvalidReply(_)
            | ProxyError::DeadlineExceeded(_) => Some(UPSTREAM_RETRY_AFTER),
            _ => None,
        }
    }

    /// The `reason` label and the `x-embedcar-error` header: stable, one per variant.
    pub fn code(&self) -> &'static str {
        self.kind().1
    }

    /// Whose failure this is, for the metrics and the log.
    pub fn blame(&self) -> Blame {
        blame_of(self.code()).unwrap_or(Blame::Internal)
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let detail = Detail(self.to_string());
        let (status, headers, body) = self.into_parts();
        let mut response = Response::new(
            Full::new(body)
                .map_err(|never| -> BoxError { match never {} })
                .boxed_unsync(),
        );
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response.extensions_mut().insert(detail);
        response
    }

    /// Status, headers and body of the reply, for a reply that may be sent to several callers.
    pub fn into_parts(self) -> (StatusCode, HeaderMap, Bytes) {
        let (kind, code) = self.kind();
        let param = match &self {
            ProxyError::InvalidRequest { param, .. } => param.clone(),
            _ => None,
        };
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": code,
            }
        });
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up: Retry-After has no fractions and 0 invites a hot loop.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        (self.status(), headers, Bytes::from(body.to_string()))
    }
}

/// Whose failure an error reply is. It decides the metric that counts it and the level it is
/// logged at: the caller's own mistakes at DEBUG (they are the caller's to see, in the reply),
/// everything else at WARN (the operator's to see).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// Refused to protect embedcar or the upstream: overload, full queues or buffers, the
    /// credential's rate gate, an open circuit, shutdown. `embedcar_shed_requests_total`.
    Shed,
    /// The caller's request: malformed, too large, too slow to arrive.
    Client,
    /// The upstream failed, was unreachable, or too slow for the deadline.
    Upstream,
    /// embedcar's own bug.
    Internal,
}

/// Every code embedcar answers with and whose it is: the labels its counters start at 0 with,
/// and how a code read back from a reply's `x-embedcar-error` header is judged.
pub const CODES: [(&str, Blame); 14] = [
    ("request_too_large", Blame::Client),
    ("request_body_timeout", Blame::Client),
    ("invalid_request", Blame::Client),
    ("proxy_overloaded", Blame::Shed),
    ("proxy_shutting_down", Blame::Shed),
    ("rate_limited", Blame::Shed),
    ("upstream_circuit_open", Blame::Shed),
    ("queue_full", Blame::Shed),
    ("request_buffers_full", Blame::Shed),
    ("upstream_timeout", Blame::Upstream),
    ("upstream_unreachable", Blame::Upstream),
    ("upstream_invalid_reply", Blame::Upstream),
    ("deadline_exceeded", Blame::Upstream),
    ("internal_error", Blame::Internal),
];

/// The code as a `'static` label and whose it is, for a code embedcar knows.
pub fn known_code(code: &str) -> Option<(&'static str, Blame)> {
    CODES.iter().copied().find(|(c, _)| *c == code)
}

fn blame_of(code: &str) -> Option<Blame> {
    known_code(code).map(|(_, b)| b)
}

/// The message of an error embedcar answered itself, kept on the reply for the failure log
/// (the body is already bytes by then).
#[derive(Debug, Clone)]
pub struct Detail(pub String);

/// How many upstream attempts a reply took, kept on the reply for the failure log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(pub u32);

/// A body embedcar could not hold: 503 while other bodies fill the budget, 413 when the body
/// alone could never fit in it.
impl From<crate::http::body::Refused> for ProxyError {
    fn from(refused: crate::http::body::Refused) -> Self {
        match refused {
            crate::http::body::Refused::Full => ProxyError::BuffersFull {
                retry_after: crate::http::body::BUFFERS_FULL_RETRY_AFTER,
            },
            crate::http::body::Refused::TooLarge { capacity } => {
                ProxyError::BodyTooLarge { limit: capacity }
            }
        }
    }
}

/// A coded body that is not what its label says is the caller's mistake (400); one that
/// inflates past the body limit is too large (413), like a plain body of that size.
impl From<crate::http::body::DecodeError> for ProxyError {
    fn from(e: crate::http::body::DecodeError) -> Self {
        match e {
            crate::http::body::DecodeError::TooLarge { limit } => {
                ProxyError::BodyTooLarge { limit }
            }
            invalid @ crate::http::body::DecodeError::Invalid(_) => ProxyError::InvalidRequest {
                message: invalid.to_string(),
                param: None,
            },
        }
    }
}

/// The reply for a handler that panicked: the panic is logged, the caller gets a 500 in OpenAI's
/// shape, and the process and every other request carry on.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response<ProxyBody> {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = what, "request handler panicked");
    ProxyError::Internal("the request handler failed".into()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(r: Response<ProxyBody>) -> serde_json::Value {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn every_error_has_openais_shape() {
        let all = [
            ProxyError::BodyTooLarge { limit: 10 },
            ProxyError::ClientBodyTimeout(Duration::from_secs(1)),
            ProxyError::Overloaded {
                max_concurrency: 4,
                waited: Duration::from_secs(1),
                retry_after: Duration::from_millis(1500),
            },
            ProxyError::ShuttingDown,
            ProxyError::RateLimited {
                retry_after: Duration::from_secs(2),
            },
            ProxyError::CircuitOpen {
                retry_after: Duration::from_secs(5),
            },
            ProxyError::QueueFull {
                retry_after: Duration::from_secs(1),
            },
            ProxyError::BuffersFull {
                retry_after: Duration::from_secs(1),
            },
            ProxyError::UpstreamTimeout(Duration::from_secs(3)),
            ProxyError::UpstreamUnreachable("refused".into()),
            ProxyError::UpstreamInvalidReply("truncated".into()),
            ProxyError::DeadlineExceeded(Duration::from_secs(1)),
            ProxyError::InvalidRequest {
                message: "bad".into(),
                param: Some("input".into()),
            },
            ProxyError::Internal("x".into()),
        ];
        for e in all {
            let status = e.status();
            let retry = e.retry_after();
            let r = e.into_response();
            assert_eq!(r.status(), status);
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            if retry.is_some() {
                assert!(r.headers().contains_key(header::RETRY_AFTER));
            }
            let v = body_json(r).await;
            let err = &v["error"];
            assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(err["type"].is_string());
            assert!(err["code"].is_string());
            assert!(err.get("param").is_some());
        }
    }

    #[test]
    fn every_code_is_listed_with_its_blame() {
        let all = [
            ProxyError::BodyTooLarge { limit: 1 },
            ProxyError::ClientBodyTimeout(Duration::ZERO),
            ProxyError::Overloaded {
                max_concurrency: 1,
                waited: Duration::ZERO,
                retry_after: Duration::ZERO,
            },
            ProxyError::ShuttingDown,
            ProxyError::RateLimited {
                retry_after: Duration::ZERO,
            },
            ProxyError::CircuitOpen {
                retry_after: Duration::ZERO,
            },
            ProxyError::QueueFull {
                retry_after: Duration::ZERO,
            },
            ProxyError::BuffersFull {
                retry_after: Duration::ZERO,
            },
            ProxyError::UpstreamTimeout(Duration::ZERO),
            ProxyError::UpstreamUnreachable(String::new()),
            ProxyError::UpstreamInvalidReply(String::new()),
            ProxyError::DeadlineExceeded(Duration::ZERO),
            ProxyError::InvalidRequest {
                message: String::new(),
                param: None,
            },
            ProxyError::Internal(String::new()),
        ];
        assert_eq!(all.len(), CODES.len());
        for e in &all {
            assert!(known_code(e.code()).is_some(), "{} is not listed", e.code());
        }
        assert_eq!(all[0].blame(), Blame::Client);
        assert_eq!(all[6].blame(), Blame::Shed);
        assert_eq!(all[9].blame(), Blame::Upstream);
        // The caller's own mistakes are 4xx; nothing else embedcar answers is, but a rate gate's 429.
        for e in &all {
            let client =
                e.status().is_client_error() && e.status() != StatusCode::TOO_MANY_REQUESTS;
            assert_eq!(client, e.blame() == Blame::Client, "{}", e.code());
        }
    }

    #[test]
    fn durations_in_messages_read_like_people_write_them() {
        let e = ProxyError::CircuitOpen {
            retry_after: Duration::from_millis(4500),
        };
        assert!(e.to_string().ends_with("retry after 4.5s"), "{e}");
        let e = ProxyError::UpstreamTimeout(Duration::from_secs(90));
        assert!(e.to_string().ends_with("within 90s"), "{e}");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = ProxyError::Overloaded {
            max_concurrency: 1,
            waited: Duration::ZERO,
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
