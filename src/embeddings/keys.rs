//! Who may share what. A batch key holds everything that shapes an answer or a bill; inputs
//! share an upstream call, an in-flight entry or a cache entry only under equal keys.
//!
//! The credential is kept as a SHA-256 fingerprint, never as the key itself. Headers that vary
//! per request without changing the answer (the configured ignore list) are left out, so
//! ordinary and traced traffic still batches; every other end-to-end header must match.

use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use xxhash_rust::xxh3::Xxh3;

use super::request::Input;
use crate::upstream::credential::credential_fingerprint;

/// Headers the key covers on their own (credential, tenant) or that never reach the upstream.
const SEPARATELY_KEYED: [&str; 5] = [
    "authorization",
    "api-key",
    "openai-organization",
    "openai-project",
    "host",
];

const ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
const PROJECT: HeaderName = HeaderName::from_static("openai-project");

/// Everything that must be equal for two inputs to share an upstream call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey(Arc<KeyParts>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct KeyParts {
    credential: [u8; 32],
    organization: Option<String>,
    project: Option<String>,
    /// Path and query on the upstream (Azure: the deployment and api-version live here).
    target: String,
    model: Option<String>,
    dimensions: Option<u32>,
    user: Option<String>,
    /// Hash of the remaining end-to-end headers, names and values, sorted.
    headers: u128,
}

/// The matcher for the configured ignore list (exact names, or prefixes ending in `*`).
#[derive(Debug, Clone)]
pub struct IgnoredHeaders {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl IgnoredHeaders {
    pub fn new(list: &[String]) -> Self {
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        for item in list {
            let item = item.trim().to_ascii_lowercase();
            match item.strip_suffix('*') {
                Some(prefix) => prefixes.push(prefix.to_string()),
                None => exact.push(item),
            }
        }
        Self { exact, prefixes }
    }

    pub fn ignores(&self, name: &str) -> bool {
        self.exact.iter().any(|e| e == name) || self.prefixes.iter().any(|p| name.starts_with(p))
    }
}

pub struct KeyInputs<'a> {
    pub headers: &'a HeaderMap,
    pub target: &'a str,
    pub model: Option<&'a str>,
    pub dimensions: Option<u32>,
    pub user: Option<&'a str>,
    /// The fingerprint to use instead of the caller's headers' (embedcar holds the key).
    pub credential: Option<[u8; 32]>,
}

impl BatchKey {
    pub fn new(k: KeyInputs<'_>, ignored: &IgnoredHeaders) -> BatchKey {
        let text = |name: HeaderName| {
            k.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        BatchKey(Arc::new(KeyParts {
            credential: k
                .credential
                .unwrap_or_else(|| credential_fingerprint(k.headers)),
            organization: text(ORGANIZATION),
            project: text(PROJECT),
            target: k.target.to_string(),
            model: k.model.map(str::to_string),
            dimensions: k.dimensions,
            user: k.user.map(str::to_string),
            headers: header_signature(k.headers, ignored),
        }))
    }

    /// The namespace of this key's cache entries: everything in the key, or (when the operator
    /// lets tenants share) everything but the credential and the tenant headers.
    pub fn cache_scope(&self, share_across_credentials: bool) -> u128 {
        let p = &*self.0;
        let mut h = Xxh3::new();
        if !share_across_credentials {
            h.update(&p.credential);
            feed_opt(&mut h, p.organization.as_deref());
            feed_opt(&mut h, p.project.as_deref());
        }
        feed(&mut h, p.target.as_bytes());
        feed_opt(&mut h, p.model.as_deref());
        h.update(&p.dimensions.map_or(0, |d| u64::from(d) + 1).to_le_bytes());
        feed_opt(&mut h, p.user.as_deref());
        h.update(&p.headers.to_le_bytes());
        h.digest128()
    }

    /// The credential's fingerprint, which the rate gates key on.
    pub fn credential(&self) -> &[u8; 32] {
        &self.0.credential
    }
}

fn header_signature(headers: &HeaderMap, ignored: &IgnoredHeaders) -> u128 {
    let mut kept: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .filter(|(n, _)| !SEPARATELY_KEYED.contains(n) && !ignored.ignores(n))
        .collect();
    kept.sort_unstable();
    let mut h = Xxh3::new();
    for (n, v) in kept {
        feed(&mut h, n.as_bytes());
        feed(&mut h, v);
    }
    h.digest128()
}

/// Feeds a length-prefixed field, so that ("ab","c") and ("a","bc") hash differently.
fn feed(h: &mut Xxh3, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn feed_opt(h: &mut Xxh3, s: Option<&str>) {
    match s {
        None => h.update(&[0]),
        Some(s) => {
            h.update(&[1]);
            feed(h, s.as_bytes());
        }
    }
}

/// The identity of one input within a batch key: a 128-bit hash of its exact text or ids,
/// tagged so that a text and a token array never collide by construction.
pub fn input_hash(input: &Input) -> u128 {
    let mut h = Xxh3::new();
    match input {
        Input::Text(s) => {
            h.update(b"t");
            h.update(s.as_bytes());
        }
        Input::Tokens(ids) => {
            h.update(b"i");
            for id in ids {
                h.update(&id.to_le_bytes());
            }
        }
    }
    h.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key(headers: &[(&str, &str)], model: &str) -> BatchKey {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let ignored = IgnoredHeaders::new(
            &crate::config::DEFAULT_IGNORE_HEADERS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        );
        BatchKey::new(
            KeyInputs {
                headers: &map,
                target: "/v1/embeddings",
                model: Some(model),
                dimensions: None,
                user: None,
                credential: None,
            },
            &ignored,
        )
    }

    #[test]
    fn credentials_tenants_models_and_other_headers_separate_keys() {
        let base = key(&[("authorization", "Bearer a")], "m");
        assert_eq!(base, key(&[("authorization", "Bearer a")], "m"));
        assert_ne!(base, key(&[("authorization", "Bearer b")], "m"));
        assert_ne!(base, key(&[("api-key", "Bearer a")], "m"));
        assert_ne!(base, key(&[("authorization", "Bearer a")], "m2"));
        assert_ne!(
            base,
            key(
                &[("authorization", "Bearer a"), ("openai-project", "p")],
                "m"
            )
        );
        assert_ne!(
            base,
            key(&[("authorization", "Bearer a"), ("openai-beta", "x")], "m")
        );
    }

    #[test]
    fn per_request_headers_do_not_separate_keys() {
        let base = key(&[("authorization", "Bearer a")], "m");
        let traced = key(
            &[
                ("authorization", "Bearer a"),
                ("user-agent", "OpenAI/Python 9.9"),
                ("x-stainless-retry-count", "1"),
                ("x-stainless-os", "Linux"),
                ("traceparent", "00-abc-def-01"),
                ("content-length", "42"),
                ("x-request-id", "r1"),
            ],
            "m",
        );
        assert_eq!(base, traced);
    }

    #[test]
    fn cache_scopes_separate_tenants_unless_shared() {
        let a = key(&[("authorization", "Bearer a")], "m");
        let b = key(&[("authorization", "Bearer b")], "m");
        assert_ne!(a.cache_scope(false), b.cache_scope(false));
        assert_eq!(a.cache_scope(true), b.cache_scope(true));
        let other_model = key(&[("authorization", "Bearer a")], "m2");
        assert_ne!(a.cache_scope(true), other_model.cache_scope(true));
    }

    #[test]
    fn text_and_token_inputs_never_share_a_hash() {
        assert_ne!(
            input_hash(&Input::Text("a".into())),
            input_hash(&Input::Tokens(vec![97]))
        );
        assert_eq!(
            input_hash(&Input::Text("a".into())),
            input_hash(&Input::Text("a".into()))
        );
    }
}
