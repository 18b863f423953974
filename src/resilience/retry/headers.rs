//! What the upstream says about when to come back: `retry-after-ms` and `retry-after` (seconds
//! or an HTTP date), and OpenAI's `x-ratelimit-*` headers, read once per reply for the retry loop
//! and the rate gates.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, StatusCode};

/// What the upstream said about a credential's remaining budget, from one reply's headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitHeaders {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
    /// `retry-after-ms`, else `retry-after` (seconds or an HTTP date).
    pub retry_after: Option<Duration>,
}

/// Names made at compile time: a lookup by `&str` parses the name first, and every upstream
/// reply is read for all six.
pub(super) const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// The headers `RateLimitHeaders::parse` reads, in the order of its slots (a static: a const
/// array of names would be built afresh for every header compared).
static RATE_LIMIT_HEADERS: [HeaderName; 6] = [
    RETRY_AFTER_MS,
    http::header::RETRY_AFTER,
    REMAINING_REQUESTS,
    REMAINING_TOKENS,
    RESET_REQUESTS,
    RESET_TOKENS,
];

impl RateLimitHeaders {
    /// One pass over the headers (every upstream reply is read here, and a reply has a dozen
    /// headers at most, where six hashed lookups cost more); the first value of a name counts,
    /// as `HeaderMap::get` would give it.
    pub fn parse(headers: &HeaderMap) -> RateLimitHeaders {
        let mut found: [Option<Option<&str>>; 6] = [None; 6];
        for (name, value) in headers {
            let Some(slot) = RATE_LIMIT_HEADERS.iter().position(|n| n == name) else {
                continue;
            };
            found[slot].get_or_insert_with(|| value.to_str().ok().map(str::trim));
        }
        let [retry_after_ms, retry_after, remaining_requests, remaining_tokens, reset_requests, reset_tokens] =
            found.map(Option::flatten);
        let number = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok());
        let retry_after = retry_after_ms
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .or_else(|| retry_after.and_then(parse_retry_after));
        RateLimitHeaders {
            remaining_requests: number(remaining_requests),
            remaining_tokens: number(remaining_tokens),
            reset_requests: reset_requests.and_then(parse_go_duration),
            reset_tokens: reset_tokens.and_then(parse_go_duration),
            retry_after,
        }
    }

    /// How long this credential's gate should stay shut, if the reply says it should: the
    /// server's Retry-After on a 429, else the reset of whichever budget is at zero.
    pub fn closed_for(&self, status: StatusCode) -> Option<Duration> {
        let exhausted = [
            (self.remaining_requests, self.reset_requests),
            (self.remaining_tokens, self.reset_tokens),
        ]
        .into_iter()
        .filter(|(remaining, _)| *remaining == Some(0))
        .filter_map(|(_, reset)| reset)
        .max();
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.retry_after
                .or(exhausted)
                .or_else(|| self.reset_requests.max(self.reset_tokens))
        } else {
            exhausted
        }
    }
}

/// `Retry-After`: delay-seconds (integer, and leniently a decimal) or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Go's `time.Duration` text, which OpenAI uses for `x-ratelimit-reset-*`: `1s`, `6m0s`,
/// `12ms`, `1h2m3.5s`, `250us`, `0s`.
pub fn parse_go_duration(v: &str) -> Option<Duration> {
    let mut rest = v.trim();
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut any = false;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
        any = true;
    }
    (any && total.is_finite()).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn go_durations_as_openai_sends_them() {
        let ms = Duration::from_millis;
        assert_eq!(parse_go_duration("1s"), Some(ms(1000)));
        assert_eq!(parse_go_duration("6m0s"), Some(ms(360_000)));
        assert_eq!(parse_go_duration("12ms"), Some(ms(12)));
        assert_eq!(parse_go_duration("1h2m3.5s"), Some(ms(3_723_500)));
        assert_eq!(parse_go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "s", "1x", "1.2.3s", "-1s", "soon"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_first_value_of_a_repeated_header_counts_and_other_headers_are_ignored() {
        let mut h = headers(&[
            ("content-type", "application/json"),
            ("x-request-id", "req_1"),
        ]);
        h.append(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static(" 0 "),
        );
        h.append(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("7"),
        );
        h.append(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("1m0s"),
        );
        h.append("retry-after", HeaderValue::from_static("3"));
        h.append("retry-after", HeaderValue::from_static("9"));
        let parsed = RateLimitHeaders::parse(&h);
        assert_eq!(parsed.remaining_requests, Some(0));
        assert_eq!(parsed.remaining_tokens, None);
        assert_eq!(parsed.reset_requests, Some(Duration::from_secs(60)));
        assert_eq!(parsed.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(
            parsed.closed_for(StatusCode::OK),
            Some(Duration::from_secs(60))
        );
        // A first value that is not text counts as absent, as `HeaderMap::get` would give it:
        // a later one does not stand in.
        let mut h = HeaderMap::new();
        h.append(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_bytes(b"\xff").unwrap(),
        );
        h.append(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("0"),
        );
        assert_eq!(RateLimitHeaders::parse(&h).remaining_tokens, None);
    }

    #[test]
    fn retry_after_in_seconds_milliseconds_and_http_dates() {
        let h = RateLimitHeaders::parse(&headers(&[("retry-after", "2")]));
        assert_eq!(h.retry_after, Some(Duration::from_secs(2)));
        let h = RateLimitHeaders::parse(&headers(&[
            ("retry-after", "2"),
            ("retry-after-ms", "1500"),
        ]));
        assert_eq!(h.retry_after, Some(Duration::from_millis(1500)));
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let d = parse_retry_after(&soon).unwrap();
        assert!(
            d > Duration::from_secs(28) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("later"), None);
    }

    #[test]
    fn the_gate_closes_on_429_or_an_exhausted_budget() {
        let limited = RateLimitHeaders::parse(&headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "5000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]));
        assert_eq!(
            limited.closed_for(StatusCode::OK),
            Some(Duration::from_secs(1))
        );
        let fine = RateLimitHeaders::parse(&headers(&[("x-ratelimit-remaining-requests", "10")]));
        assert_eq!(fine.closed_for(StatusCode::OK), None);
        let only_reset = RateLimitHeaders::parse(&headers(&[("x-ratelimit-reset-tokens", "3s")]));
        assert_eq!(
            only_reset.closed_for(StatusCode::TOO_MANY_REQUESTS),
            Some(Duration::from_secs(3))
        );
        let told = RateLimitHeaders::parse(&headers(&[("retry-after-ms", "20")]));
        assert_eq!(
            told.closed_for(StatusCode::TOO_MANY_REQUESTS),
            Some(Duration::from_millis(20))
        );
    }
}
