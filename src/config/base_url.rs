//! The upstream base URL as the config names it, parsed: checked with the rest of the config, and
//! joined with each request's path on the way out.
//!
//! **The path rule.** embedcar keeps the request's path and appends it to the upstream base URL:
//! `{scheme}://{host}{prefix}{path}?{query}`. The application uses
//! `OPENAI_BASE_URL=http://127.0.0.1:8080/v1`, so `/v1/embeddings` goes to
//! `https://api.openai.com/v1/embeddings` with the default upstream; an OpenAI-compatible server
//! that serves `http://host:8000/v1/...` is configured as `http://host:8000`; one that lives
//! under a prefix (`http://gw:8000/openai/v1/...`) as `http://gw:8000/openai`; Azure as
//! `https://NAME.openai.azure.com` with the application's `azure_endpoint` pointed at embedcar,
//! so `/openai/deployments/{d}/embeddings?api-version=...` keeps its path.

use http::{
    uri::{Authority, PathAndQuery, Scheme},
    Uri,
};

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
