//! Pass-through: any method, any path, to the same path on the upstream.
//!
//! Headers, query and body go through as they came, except what RFC 9110 says a proxy must not
//! forward (hop-by-hop headers) and `Host`, which names the upstream. Bodies stream in both
//! directions frame by frame, so server-sent events reach the caller as the upstream writes them
//! and an upload never sits whole in memory. An upstream slot is held from before the request is
//! sent until the response body ends, so a long stream counts against the concurrency limit for
//! as long as it runs.

use std::{sync::Arc, time::Duration};

use http::{header, HeaderMap, HeaderName, Request, Response, Version};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::{
    body::{find_cause, BodyIdleTimeout, BodyTooLarge, BoxError, Guarded, IdleTimeout, ProxyBody},
    errors::ProxyError,
    limits::ConcurrencyLimit,
    metrics::{Metrics, Route},
    upstream::Upstream,
};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones that mean the same. Never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub struct Proxy {
    upstream: Arc<Upstream>,
    limit: ConcurrencyLimit,
    metrics: Arc<Metrics>,
    first_byte_timeout: Duration,
    body_idle_timeout: Duration,
}

impl Proxy {
    pub fn new(
        upstream: Arc<Upstream>,
        limit: ConcurrencyLimit,
        metrics: Arc<Metrics>,
        first_byte_timeout: Duration,
        body_idle_timeout: Duration,
    ) -> Self {
        Self {
            upstream,
            limit,
            metrics,
            first_byte_timeout,
            body_idle_timeout,
        }
    }

    /// Sends `req` to the upstream and returns its response as it arrives.
    pub async fn forward(
        &self,
        req: Request<ProxyBody>,
        route: Route,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        parts.uri = self
            .upstream
            .base
            .join(parts.uri.path_and_query())
            .map_err(|e| ProxyError::InvalidRequest {
                message: format!("cannot map the request path onto the upstream: {e}"),
                param: None,
            })?;
        // HTTP/2 requests arrive with the version set; the client picks the upstream's own.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        strip_upgrade(&mut parts.headers);
        // The client sets Host (or :authority) from the upstream URI.
        parts.headers.remove(header::HOST);
        if let Some(credential) = &self.upstream.credential {
            credential.apply(&mut parts.headers);
        }

        let slot = self.limit.acquire(None).await?;
        let started = Instant::now();
        let sent = tokio::time::timeout(
            self.first_byte_timeout,
            self.upstream
                .client
                .request(Request::from_parts(parts, body)),
        )
        .await;
        let elapsed = started.elapsed();
        let mut response = match sent {
            Err(_) => {
                self.metrics.observe_upstream(route, "timeout", elapsed);
                self.metrics
                    .deadline_expired
                    .with_label_values(&["first_byte"])
                    .inc();
                return Err(ProxyError::UpstreamTimeout(self.first_byte_timeout));
            }
            Ok(Err(e)) => return Err(self.classify_send_error(route, elapsed, &e)),
            Ok(Ok(r)) => r,
        };
        self.metrics
            .observe_upstream(route, response.status().as_str(), elapsed);

        strip_hop_by_hop(response.headers_mut());
        *response.version_mut() = Version::HTTP_11;
        let metrics = self.metrics.clone();
        Ok(response.map(|incoming| {
            let watched =
                IdleTimeout::new(incoming, self.body_idle_timeout).map_err(move |e: BoxError| {
                    if e.is::<BodyIdleTimeout>() {
                        metrics
                            .deadline_expired
                            .with_label_values(&["body_idle"])
                            .inc();
                    }
                    e
                });
            Guarded::new(watched, slot).boxed_unsync()
        }))
    }

    /// Turns a failed exchange into the caller's error: our own body limits first (the request
    /// body failed while being streamed), then connection failures.
    fn classify_send_error(
        &self,
        route: Route,
        elapsed: Duration,
        e: &hyper_util::client::legacy::Error,
    ) -> ProxyError {
        if let Some(too_large) = find_cause::<BodyTooLarge>(e) {
            return ProxyError::BodyTooLarge {
                limit: too_large.limit,
            };
        }
        if let Some(idle) = find_cause::<BodyIdleTimeout>(e) {
            return ProxyError::ClientBodyTimeout(idle.0);
        }
        let outcome = if e.is_connect() {
            "connect_error"
        } else {
            "io_error"
        };
        self.metrics.observe_upstream(route, outcome, elapsed);
        ProxyError::UpstreamUnreachable(error_chain(e))
    }
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Upgrade is hop-by-hop too, but only on the request side do we drop it unconditionally:
/// embedcar does not tunnel protocol switches (WebSocket), so it asks for none.
fn strip_upgrade(headers: &mut HeaderMap) {
    headers.remove(header::UPGRADE);
}

/// An error and its causes on one line: hyper's own Display says only "client error (Connect)".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert("openai-organization", HeaderValue::from_static("org"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["authorization", "openai-organization"]);
    }
}
