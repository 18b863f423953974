//! The upstream: where requests go (base URL and the path rule), with which credential, over
//! one pooled client built once for the life of the process.
//!
//! **The path rule.** embedcar keeps the request's path and appends it to the upstream base URL:
//! `{scheme}://{host}{prefix}{path}?{query}`. The application uses
//! `OPENAI_BASE_URL=http://127.0.0.1:8080/v1`, so `/v1/embeddings` goes to
//! `https://api.openai.com/v1/embeddings` with the default upstream; an OpenAI-compatible server
//! that serves `http://host:8000/v1/...` is configured as `http://host:8000`; one that lives
//! under a prefix (`http://gw:8000/openai/v1/...`) as `http://gw:8000/openai`; Azure as
//! `https://NAME.openai.azure.com` with the application's `azure_endpoint` pointed at embedcar,
//! so `/openai/deployments/{d}/embeddings?api-version=...` keeps its path.

use std::{sync::Arc, time::Duration};

use http::{
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, HeaderValue, Uri,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use crate::{
    body::ProxyBody,
    config::{Config, CredentialHeader},
};

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// The parsed upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without a trailing slash; empty for none.
    prefix: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{:?} is not a URL: {e}", Self::mask_userinfo(url)))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| "needs a scheme, http:// or https://".to_string())?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!(
                "scheme {scheme} is not supported; use http:// or https://"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| "needs a host".to_string())?;
        if authority.as_str().contains('@') {
            return Err("must not carry credentials in the URL; use [credentials]".into());
        }
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(BaseUrl {
            scheme,
            authority,
            prefix,
        })
    }

    /// The upstream URI for a request path (and query) as the client sent it.
    pub fn join(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map(PathAndQuery::as_str).unwrap_or("/");
        let joined = if self.prefix.is_empty() {
            pq.to_string()
        } else {
            format!("{}{}", self.prefix, pq)
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(joined)
            .build()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `url` with any `user:password@` replaced, for logs and printed configs.
    pub fn mask_userinfo(url: &str) -> String {
        match (url.find("://"), url.find('@')) {
            (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
            _ => url.to_string(),
        }
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

/// A key embedcar holds and sends in place of whatever the caller sent.
#[derive(Clone)]
pub struct Credential {
    header: HeaderName,
    value: HeaderValue,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: ***)", self.header)
    }
}

impl Credential {
    /// Loads the key named by the config, if one is. Errors say where it was looked for, never
    /// what was found.
    pub fn from_config(config: &Config) -> Result<Option<Credential>, String> {
        let c = &config.credentials;
        let key = if let Some(var) = &c.api_key_env {
            std::env::var(var)
                .map_err(|_| format!("credentials.api_key_env: variable {var} is not set"))?
        } else if let Some(path) = &c.api_key_file {
            std::fs::read_to_string(path)
                .map_err(|e| format!("credentials.api_key_file: cannot read {path}: {e}"))?
        } else {
            return Ok(None);
        };
        let key = key.trim();
        if key.is_empty() {
            return Err("credentials: the configured key is empty".into());
        }
        Credential::new(c.header, key).map(Some)
    }

    pub fn new(header: CredentialHeader, key: &str) -> Result<Credential, String> {
        let (name, text) = match header {
            CredentialHeader::Authorization => (header::AUTHORIZATION, format!("Bearer {key}")),
            CredentialHeader::ApiKey => (HeaderName::from_static("api-key"), key.to_string()),
        };
        let mut value = HeaderValue::from_str(&text)
            .map_err(|_| "credentials: the key has characters not allowed in a header")?;
        value.set_sensitive(true);
        Ok(Credential {
            header: name,
            value,
        })
    }

    /// Replaces the caller's credentials (both header kinds) with this one.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.remove(header::AUTHORIZATION);
        headers.remove("api-key");
        headers.insert(self.header.clone(), self.value.clone());
    }
}

/// Where and how requests go: the base URL, the optional held credential, and the pooled client.
pub struct Upstream {
    pub base: BaseUrl,
    pub credential: Option<Credential>,
    pub client: HttpsClient,
}

impl Upstream {
    pub fn new(config: &Config) -> Result<Arc<Upstream>, String> {
        let base = BaseUrl::parse(&config.upstream.url)?;
        let credential = Credential::from_config(config)?;
        let client = build_client(
            config.upstream.connect_timeout,
            config.upstream.pool_idle_timeout,
            config.upstream.pool_max_idle_per_host,
        )?;
        Ok(Arc::new(Upstream {
            base,
            credential,
            client,
        }))
    }
}

/// One pooled client for every request: keep-alive with an idle timeout enforced by a real pool
/// timer (without it hyper only notices idle connections when it next touches the pool), TCP
/// connect timeout, TLS by rustls with bundled Mozilla roots, HTTP/2 when the server offers it
/// in ALPN (one multiplexed connection instead of hundreds), HTTP/1.1 otherwise.
fn build_client(
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
) -> Result<HttpsClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(https))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pq(s: &str) -> PathAndQuery {
        s.parse().unwrap()
    }

    #[test]
    fn the_request_path_is_appended_to_the_base_url() {
        let b = BaseUrl::parse("https://api.openai.com").unwrap();
        assert_eq!(
            b.join(Some(&pq("/v1/embeddings"))).unwrap(),
            "https://api.openai.com/v1/embeddings"
        );
        let b = BaseUrl::parse("http://gw:8000/openai/").unwrap();
        assert_eq!(
            b.join(Some(&pq("/v1/models?limit=2"))).unwrap(),
            "http://gw:8000/openai/v1/models?limit=2"
        );
        let b = BaseUrl::parse("https://name.openai.azure.com").unwrap();
        assert_eq!(
            b.join(Some(&pq(
                "/openai/deployments/e/embeddings?api-version=2024-02-01"
            )))
            .unwrap(),
            "https://name.openai.azure.com/openai/deployments/e/embeddings?api-version=2024-02-01"
        );
    }

    #[test]
    fn unusable_base_urls_are_refused_with_a_reason() {
        assert!(BaseUrl::parse("ftp://x").unwrap_err().contains("scheme"));
        assert!(BaseUrl::parse("/just/a/path").is_err());
        assert!(BaseUrl::parse("https://u:p@host")
            .unwrap_err()
            .contains("credentials"));
        assert!(BaseUrl::parse("https://host/?q=1").is_err());
    }

    #[test]
    fn a_held_credential_replaces_both_kinds_of_caller_key_and_is_not_printed() {
        let c = Credential::new(CredentialHeader::Authorization, "sk-real").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer dummy"),
        );
        h.insert("api-key", HeaderValue::from_static("dummy"));
        c.apply(&mut h);
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-real");
        assert!(h[header::AUTHORIZATION].is_sensitive());
        assert!(!h.contains_key("api-key"));
        assert!(!format!("{c:?}").contains("sk-real"));
        let c = Credential::new(CredentialHeader::ApiKey, "azure-key").unwrap();
        c.apply(&mut h);
        assert_eq!(h["api-key"], "azure-key");
        assert!(!h.contains_key(header::AUTHORIZATION));
    }
}
