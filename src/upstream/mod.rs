//! The upstream: where requests go (the base URL, whose path rule is in
//! `crate::config::base_url`), with which credential, over one pooled client built once for the
//! life of the process.
//!
//! This folder is the bottom of the flow, where a call leaves embedcar: the pooled client and
//! the base URL (here), the held key and its rotation (`credential`), and the one outbound tower
//! stack every upstream call goes down (`outbound`), whose layers live in `crate::resilience`.

pub mod credential;
pub mod outbound;

use std::{sync::Arc, time::Duration};

use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use self::credential::HeldCredential;
use crate::{
    config::{base_url::BaseUrl, Config},
    http::body::ProxyBody,
};

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

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
