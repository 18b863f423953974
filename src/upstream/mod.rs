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
//!
//! This folder is the bottom of the flow, where a call leaves embedcar: the pooled client and
//! the base URL (here), the held key and its rotation (`credential`), and the one outbound tower
//! stack every upstream call goes down (`outbound`), whose layers live in `crate::resilience`.

pub mod credential;
pub mod outbound;

use std::{sync::Arc, time::Duration};

use http::{
    uri::{Authority, PathAndQuery, Scheme},
    Uri,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use self::credential::HeldCredential;
use crate::{config::Config, http::body::ProxyBody};

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

/// Where and how requests go: the base URL, the optional held credential, and the pooled client.
pub struct Upstream {
    pub base: BaseUrl,
    pub credential: Option<HeldCredential>,
    pub client: HttpsClient,
}

impl Upstream {
    pub fn new(config: &Config) -> Result<Arc<Upstream>, String> {
        let base = BaseUrl::parse(&config.upstream.url)?;
        let credential = HeldCredential::from_config(config)?;
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
}
