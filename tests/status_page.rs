//! The status page on the admin port: `/` is one self-contained page (it must work in an
//! air-gapped cluster, so it may load nothing from elsewhere) and `/status.json` reads the live
//! counters.

mod support;

use fake_openai::FakeUpstream;
use http::{Request, StatusCode};
use serde_json::{json, Value};
use support::harness::*;

/// Every `src=` / `href=` value in `html`, quoted or not.
fn link_targets(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=", "href="] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let value: String = match rest.chars().next() {
                Some(q @ ('"' | '\'')) => rest[1..].chars().take_while(|&c| c != q).collect(),
                _ => rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '>')
                    .collect(),
            };
            out.push(value);
        }
    }
    out
}

#[tokio::test]
async fn the_page_is_self_contained_html() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;

    let r = send(&client(), get(&format!("{}/", proxy.admin_url()))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    let csp = header("content-security-policy");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let page = String::from_utf8(body_bytes(r).await.to_vec()).unwrap();

    assert!(page.starts_with("<!doctype html>"));
    assert!(page.contains("status.json"), "the page polls its JSON");
    for scheme in ["http://", "https://"] {
        assert!(
            !page.contains(scheme),
            "the page names an external URL ({scheme})"
        );
    }
    for target in link_targets(&page) {
        assert!(
            !target.starts_with("//") && !target.contains("://"),
            "external src/href: {target}"
        );
    }
    for css_fetch in ["@import", "url("] {
        assert!(
            !page.contains(css_fetch),
            "the page's CSS fetches ({css_fetch})"
        );
    }
    assert!(
        page.len() < 16 * 1024,
        "the page stays small: {} bytes",
        page.len()
    );

    // HEAD answers as GET does, without the body.
    let head = Request::head(format!("{}/status.json", proxy.admin_url()))
        .body(embedcar::body::empty())
        .unwrap();
    let r = send(&client(), head).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get("content-type").unwrap(), "application/json");
    assert!(body_bytes(r).await.is_empty());

    // Unknown paths still list the endpoints, the new ones included.
    let (status, text) = admin_text(&proxy, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for endpoint in ["/status.json", "/healthz", "/readyz", "/metrics"] {
        assert!(text.contains(endpoint), "{text}");
    }
}

async fn status_json(proxy: &embedcar::Handle) -> Value {
    let r = send(
        &client(),
        get(&format!("{}/status.json", proxy.admin_url())),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get("cache-control").unwrap(), "no-store");
    body_json(r).await
}

#[tokio::test]
async fn the_json_counts_inputs_calls_and_cache_hits() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config_for(&upstream.url())).await;

    let before = status_json(&proxy).await;
    let e = &before["embeddings"];
    assert_eq!(e["inputs"], 0);
    assert_eq!(e["upstream_calls"], 0);
    assert!(e["cache_hit_ratio"].is_null(), "no ratio before any input");
    assert_eq!(before["breaker"]["state"], "closed");
    assert_eq!(before["concurrency"]["adaptive"], true);
    assert!(before["concurrency"]["limit"]
        .as_u64()
        .is_some_and(|l| l >= 1));
    assert_eq!(before["history"]["interval_seconds"], 5);
    assert!(before["history"]["inputs"].is_array());

    // Three distinct inputs, then the same three again: the repeats are answered from the cache.
    let client = client();
    let url = format!("{}/v1/embeddings", proxy.url());
    let body = json!({"model": "text-embedding-3-small", "input": ["alpha", "beta", "gamma"]});
    for _ in 0..2 {
        let r = send(&client, post_json(&url, &body)).await;
        assert_eq!(r.status(), StatusCode::OK);
        body_bytes(r).await;
    }
    // An invalid request is answered by embedcar itself: it shows up by reason, as an error
    // (nothing was shed).
    let r = send(&client, post_json(&url, &json!({"model": "m"}))).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    body_bytes(r).await;

    let after = status_json(&proxy).await;
    let e = &after["embeddings"];
    assert_eq!(e["inputs"], 6, "{after}");
    assert_eq!(e["cache_hits"], 3, "{after}");
    assert_eq!(e["upstream_inputs"], 3, "{after}");
    assert_eq!(e["upstream_calls"], upstream.embedding_calls(), "{after}");
    assert!(e["upstream_calls"].as_u64().is_some_and(|c| c >= 1));
    assert_eq!(e["saved_inputs"], 3, "{after}");
    assert_eq!(e["cache_hit_ratio"], 0.5, "{after}");
    assert!(
        e["cache_entries"].as_u64().is_some_and(|n| n >= 3),
        "{after}"
    );
    assert!(e["tokens_cache"].as_u64().is_some_and(|n| n > 0), "{after}");
    let ok = &after["upstream_statuses"]["200"];
    assert_eq!(ok["total"], upstream.embedding_calls(), "{after}");
    assert_eq!(ok["recent"], ok["total"], "every call is within the window");
    assert!(
        after["concurrency"]["latency_recent_seconds"]
            .as_f64()
            .is_some(),
        "{after}"
    );
    let total = |key: &str| {
        after[key]
            .as_object()
            .unwrap_or_else(|| panic!("{key} by reason"))
            .values()
            .map(|v| v["total"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(total("shed"), 0, "{after}");
    assert_eq!(total("errors_by_reason"), 1, "{after}");
    assert_eq!(
        after["errors_by_reason"]["invalid_request"]["total"], 1,
        "{after}"
    );
}
