//! Steering the fake: the default [`Behavior`], limited [`Rule`]s, the per-request `x-fake-*`
//! headers, and how they resolve, once per request, into its [`Plan`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::HeaderMap;

use crate::headers;
use crate::replies::forced_error_body;
use crate::server::{lock, Shared};

/// What the fake does with a request that no header override or rule claims.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Behavior {
    /// Answer as the endpoint normally does.
    #[default]
    Normal,
    /// Wait, then answer normally. Uses tokio's clock, so paused-time tests work.
    Delay(Duration),
    /// Answer exactly this: status, headers and body (content-type `application/json` is added
    /// when the headers have none and the body is not empty). See [`Behavior::openai_error`].
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Read the request, then never answer. The handler is dropped when the client goes away
    /// (or the fake shuts down), so `in_flight` falls back.
    Hang,
    /// Read the request, then close the connection without a response (HTTP/2: reset the
    /// stream), like an upstream that crashes or a load balancer that cuts the connection.
    Drop,
    /// `200 OK`, `application/json`, correct framing, but the JSON is cut in half.
    Malformed,
    /// `200 OK` and the first part of the body, then the connection breaks (HTTP/2: the stream
    /// is reset): a reply cut off mid-way.
    Cut,
    /// Answer normally, adding these headers (e.g. `x-ratelimit-remaining-requests: 0`).
    Headers(Vec<(String, String)>),
}

impl Behavior {
    /// A `Status` reply with OpenAI's error shape and the `type`/`code` OpenAI uses for this
    /// status (429 → `rate_limit_exceeded`, 5xx → `server_error`, ...).
    pub fn openai_error(status: u16) -> Behavior {
        Behavior::Status {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: String::from_utf8(forced_error_body(status)).expect("JSON is UTF-8"),
        }
    }

    /// Adds a reply header: to a `Status` reply's headers, or turns `Normal`/`Headers` into
    /// `Headers`. For `Delay`, `Hang`, `Drop` and `Malformed` the header is ignored (use a
    /// `Status` for a delayed error, or per-request `x-fake-header`).
    pub fn with_header(self, name: &str, value: &str) -> Behavior {
        let pair = (name.to_string(), value.to_string());
        match self {
            Behavior::Status {
                status,
                mut headers,
                body,
            } => {
                headers.push(pair);
                Behavior::Status {
                    status,
                    headers,
                    body,
                }
            }
            Behavior::Normal => Behavior::Headers(vec![pair]),
            Behavior::Headers(mut h) => {
                h.push(pair);
                Behavior::Headers(h)
            }
            other => other,
        }
    }
}

/// A limited override, checked before the default behaviour. Rules are kept in a queue; each
/// request takes the first rule whose `path_contains` matches its path (rules that do not match
/// are skipped, not consumed), uses its behaviour and decrements `times`; a rule is removed when
/// `times` reaches 0. A request steered by `x-fake-*` headers does not consume rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub behavior: Behavior,
    pub times: usize,
    /// Only requests whose path contains this string match (`None`: every request).
    pub path_contains: Option<String>,
}

impl Rule {
    /// The next matching request gets `behavior`.
    pub fn once(behavior: Behavior) -> Rule {
        Rule::repeat(behavior, 1)
    }

    /// The next `times` matching requests get `behavior`.
    pub fn repeat(behavior: Behavior, times: usize) -> Rule {
        Rule {
            behavior,
            times,
            path_contains: None,
        }
    }

    /// Restricts the rule to paths containing `fragment` (e.g. `"/embeddings"`).
    pub fn on_path(mut self, fragment: &str) -> Rule {
        self.path_contains = Some(fragment.to_string());
        self
    }
}

impl Shared {
    /// Resolves what to do: header overrides, then rules, then the default behaviour.
    pub(crate) fn plan_for(&self, parts: &http::request::Parts) -> Plan {
        let h = &parts.headers;
        let mut extra = Vec::new();
        for v in h.get_all(headers::HEADER) {
            if let Some((k, v)) = v.to_str().ok().and_then(|s| s.split_once(':')) {
                extra.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        if let Some(mut plan) = self.header_override(h) {
            plan.extra_headers.extend(extra);
            return plan;
        }
        let from_rule = {
            let mut rules = lock(&self.rules);
            let path = parts.uri.path();
            let pos = rules.iter().position(|r| match &r.path_contains {
                Some(frag) => path.contains(frag.as_str()),
                None => true,
            });
            pos.map(|i| {
                let rule = &mut rules[i];
                rule.times -= 1;
                let b = rule.behavior.clone();
                if rule.times == 0 {
                    rules.remove(i);
                }
                b
            })
        };
        let behavior = from_rule.unwrap_or_else(|| lock(&self.behavior).clone());
        let mut plan = Plan::from_behavior(behavior);
        plan.extra_headers.extend(extra);
        plan
    }

    fn header_override(&self, h: &HeaderMap) -> Option<Plan> {
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let flag = |name: &str| text(name).is_some_and(|v| !matches!(v, "" | "0" | "false"));
        let delay = text(headers::DELAY_MS)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let status = text(headers::STATUS).and_then(|v| v.parse::<u16>().ok());
        let action = if flag(headers::DROP) {
            Action::Drop
        } else if flag(headers::HANG) {
            Action::Hang
        } else if let Some(status) = status.filter(|s| (200..=999).contains(s)) {
            let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
            if let Some(ra) = text(headers::RETRY_AFTER) {
                headers.push((RETRY_AFTER.as_str().to_string(), ra.to_string()));
            }
            Action::Status {
                status,
                headers,
                body: Bytes::from(forced_error_body(status)),
            }
        } else if flag(headers::MALFORMED) {
            Action::Malformed
        } else if delay.is_some() {
            Action::Normal
        } else {
            return None;
        };
        if let Some(times) = text(headers::TIMES).and_then(|v| v.parse::<usize>().ok()) {
            let key = text(headers::KEY).unwrap_or("").to_string();
            let mut keyed = lock(&self.keyed);
            let used = keyed.entry(key).or_insert(0);
            if *used >= times {
                return None;
            }
            *used += 1;
        }
        Some(Plan {
            delay,
            action,
            extra_headers: Vec::new(),
        })
    }

    /// A uniform draw in [0, 1) for the fault mix.
    pub(crate) fn next_draw(&self) -> f64 {
        let mut x = self.draw.load(Ordering::Relaxed);
        loop {
            let mut next = x;
            next ^= next << 13;
            next ^= next >> 7;
            next ^= next << 17;
            match self
                .draw
                .compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (next >> 11) as f64 / (1u64 << 53) as f64,
                Err(seen) => x = seen,
            }
        }
    }
}

/// What to do with one request, resolved once at arrival.
pub(crate) struct Plan {
    pub(crate) delay: Option<Duration>,
    pub(crate) action: Action,
    pub(crate) extra_headers: Vec<(String, String)>,
}

pub(crate) enum Action {
    Normal,
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    Hang,
    Drop,
    Malformed,
    Cut,
}

impl Plan {
    fn from_behavior(b: Behavior) -> Plan {
        let (delay, action, extra_headers) = match b {
            Behavior::Normal => (None, Action::Normal, Vec::new()),
            Behavior::Delay(d) => (Some(d), Action::Normal, Vec::new()),
            Behavior::Status {
                status,
                headers,
                body,
            } => (
                None,
                Action::Status {
                    status,
                    headers,
                    body: Bytes::from(body),
                },
                Vec::new(),
            ),
            Behavior::Hang => (None, Action::Hang, Vec::new()),
            Behavior::Drop => (None, Action::Drop, Vec::new()),
            Behavior::Malformed => (None, Action::Malformed, Vec::new()),
            Behavior::Cut => (None, Action::Cut, Vec::new()),
            Behavior::Headers(h) => (None, Action::Normal, h),
        };
        Plan {
            delay,
            action,
            extra_headers,
        }
    }
}
