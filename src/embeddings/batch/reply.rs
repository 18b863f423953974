//! One exchange's reply: read whole, an error reply kept for the callers, a success decoded into
//! one outcome per input with its share of the tokens.

use hyper::body::Incoming;

use super::*;

impl Exchange {
    pub(super) async fn exchange_sending(
        &self,
        sending: Sending,
        items: usize,
        exact: bool,
        head: &HeadArrived,
    ) -> Tried<CallResult> {
        let fail = |e: ProxyError| Arc::new(Failure::from_error(e));
        let Sending {
            request,
            positions,
            sizes,
        } = sending;
        let started = Instant::now();
        let response = match self.upstream.client.request(request).await {
            Ok(r) => r,
            Err(e) => {
                let reason = RetryReason::of_send_error(&e);
                self.metrics
                    .observe_upstream(Route::Embeddings, reason.label(), started.elapsed());
                let error = ProxyError::UpstreamUnreachable(error_chain(&e));
                return Tried::broken(Err(fail(error)), reason);
            }
        };
        head.arrived();
        self.metrics.observe_upstream_status(
            Route::Embeddings,
            response.status(),
            started.elapsed(),
        );
        let (parts, incoming) = response.into_parts();
        let bytes = match self.read_reply(incoming, parts.status).await {
            Ok(bytes) => bytes,
            Err(broken) => return broken,
        };
        if !parts.status.is_success() {
            return error_reply(parts, bytes);
        }
        self.decode_reply(&bytes, &parts, positions, sizes, items, exact)
    }

    /// The reply's body, read whole (bounded in size and idle time), or the failed attempt.
    async fn read_reply(
        &self,
        incoming: Incoming,
        status: StatusCode,
    ) -> Result<Bytes, Tried<CallResult>> {
        let fail = |e: ProxyError| Arc::new(Failure::from_error(e));
        match Limited::new(
            IdleTimeout::new(incoming, self.body_idle_timeout),
            MAX_REPLY_BYTES,
        )
        .collect()
        .await
        {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) => {
                let cause = format!("the reply body failed: {}", error_chain(&*e));
                // A 200 cut short is an unusable reply; an error reply cut short, a broken link.
                let error = if status.is_success() {
                    ProxyError::UpstreamInvalidReply(cause)
                } else {
                    ProxyError::UpstreamUnreachable(cause)
                };
                Err(Tried::broken(Err(fail(error)), RetryReason::Io))
            }
        }
    }

    /// A 2xx reply decoded into one outcome per input (`items` in all, those not sent `gone`),
    /// each with its share of the tokens.
    fn decode_reply(
        &self,
        bytes: &Bytes,
        parts: &http::response::Parts,
        positions: Vec<usize>,
        sizes: Vec<u64>,
        items: usize,
        exact: bool,
    ) -> Tried<CallResult> {
        let fail = |e: ProxyError| Arc::new(Failure::from_error(e));
        let reply = match render::parse_reply(bytes, positions.len()) {
            Ok(r) => r,
            // A 200 whose body is cut or garbled: the exchange broke, another attempt may not.
            Err(e) => {
                return Tried::broken(
                    Err(fail(ProxyError::UpstreamInvalidReply(e))),
                    RetryReason::Io,
                )
            }
        };
        let render::ParsedReply {
            vectors,
            model,
            prompt_tokens: reported,
        } = reply;
        let tokens: Vec<u64> = if exact {
            sizes
        } else {
            let total = reported.unwrap_or_else(|| sizes.iter().sum());
            apportion(total, &sizes)
        };
        self.metrics
            .count_tokens(TokenSource::Upstream, tokens.iter().sum());
        let model: Arc<str> = model.into();
        let mut outcomes: Vec<Outcome> = vec![Err(gone()); items];
        for ((&position, vector), t) in positions.iter().zip(vectors).zip(tokens) {
            outcomes[position] = Ok(Arc::new(Embedded {
                vector: vector.into_boxed_slice(),
                tokens: t,
                model: model.clone(),
            }));
        }
        Tried::reply(Ok(outcomes), parts.status, &parts.headers)
    }
}

/// An error reply, kept whole for the callers (hop-by-hop headers and the length dropped) and
/// judged for the retry loop and the limit.
fn error_reply(mut parts: http::response::Parts, bytes: Bytes) -> Tried<CallResult> {
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    let status = parts.status;
    let headers = parts.headers.clone();
    // OpenAI answers a spent quota (billing) with 429 too; no wait makes it pass, and it
    // says nothing of the upstream's load.
    let quota_spent = status == StatusCode::TOO_MANY_REQUESTS
        && bytes.windows(18).any(|w| w == b"insufficient_quota");
    let mut tried = Tried::reply(
        Err(Arc::new(Failure {
            status,
            headers: parts.headers,
            body: bytes,
            attempts: None,
        })),
        status,
        &headers,
    );
    if quota_spent {
        tried.verdict = Verdict::Final;
        tried.signal = Signal::Ignore;
    }
    tried
}
