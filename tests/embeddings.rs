//! End to end through a real embedcar on port 0 in front of the fake upstream: the embeddings
//! engine turns many callers into few upstream calls, and every caller still gets exactly what
//! the upstream would have answered it directly (vectors bit for bit as float32, in its own
//! format and order, with its own usage and its own errors).
//!
//! Tests that need inputs to pile up behind busy slots do not rely on timing: `hold_slots` holds
//! every upstream slot with a streamed chat reply that the fake keeps open, the test waits until
//! embedcar's queue-depth gauge shows every input queued, then releases them.

mod support;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use embedcar::{config::UpstreamEncoding, embeddings::EmbeddingsPath, Config, Handle};
use fake_openai::{
    billed_tokens, decode_embedding, expected_embedding, parse_embedding_input, Behavior,
    EmbeddingInput, FakeOptions, FakeUpstream, Recorded, Rule,
};
use http::{HeaderValue, Request, StatusCode};
use serde_json::{json, Value};
use support::{client::*, harness::*};

/// An OpenAI embedding model: the fake bills it with cl100k, as OpenAI does.
const MODEL: &str = "text-embedding-3-small";
/// A model whose tokenizer embedcar cannot know: the fake bills it by whitespace words.
const CUSTOM_MODEL: &str = "custom-embed";
/// The fake's vector length when a request names no `dimensions`.
const FAKE_DIMS: usize = 8;

const QUEUE_DEPTH: &str = "embedcar_embeddings_queue_depth";
const ABANDONED: &str = "embedcar_embeddings_abandoned_inputs_total";
const SPLITS: &str = "embedcar_embeddings_isolation_splits_total";
const CACHE_HITS: &str = "embedcar_embeddings_cache_hits_total";
const COALESCED: &str = "embedcar_embeddings_coalesced_total";
const INPUTS: &str = "embedcar_embeddings_inputs_total";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn embeddings_url(base: &str) -> String {
    format!("{base}/v1/embeddings")
}

fn text(s: impl Into<String>) -> EmbeddingInput {
    EmbeddingInput::Text(s.into())
}

fn input_json(input: &EmbeddingInput) -> Value {
    match input {
        EmbeddingInput::Text(s) => json!(s),
        EmbeddingInput::Tokens(t) => json!(t),
    }
}

/// `{"model": MODEL, "input": [..]}`.
fn request_for(model: &str, inputs: &[EmbeddingInput]) -> Value {
    json!({"model": model, "input": inputs.iter().map(input_json).collect::<Vec<_>>()})
}

/// The vectors of a reply, read the way a real caller reads them: `data` in array order. Also
/// checks that `index` counts from 0 in that order and that each vector is written in the
/// format the caller asked for.
fn vectors(reply: &Value, encoding: &str) -> Vec<Vec<f32>> {
    assert_eq!(reply["object"], "list", "{reply}");
    let data = reply["data"].as_array().expect("data");
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i, "index out of order");
            let e = &d["embedding"];
            match encoding {
                "float" => assert!(e.is_array(), "float requested, got {e}"),
                "base64" => assert!(e.is_string(), "base64 requested, got {e}"),
                other => panic!("unknown encoding {other}"),
            }
            decode_embedding(e).expect("a decodable embedding")
        })
        .collect()
}

/// Equal as float32, bit for bit.
fn assert_same_f32(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got), bits(want), "{what}: {got:?} != {want:?}");
}

/// Checks every vector of a successful reply against what the fake computes for its input.
fn assert_vectors(reply: &Reply, inputs: &[EmbeddingInput], encoding: &str, dims: usize) {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let got = vectors(&reply.json(), encoding);
    assert_eq!(got.len(), inputs.len(), "one vector per input");
    for (i, (g, input)) in got.iter().zip(inputs).enumerate() {
        assert_same_f32(g, &expected_embedding(input, dims), &format!("input {i}"));
    }
}

/// The upstream's embeddings calls, in arrival order, with their parsed inputs.
fn embedding_calls(upstream: &FakeUpstream) -> Vec<(Recorded, Vec<EmbeddingInput>)> {
    upstream
        .requests()
        .into_iter()
        .filter(|r| r.path().ends_with("/embeddings"))
        .map(|r| {
            let body = r.json().expect("a JSON embeddings request");
            let inputs = parse_embedding_input(&body["input"]).expect("a valid input");
            (r, inputs)
        })
        .collect()
}

fn config(upstream: &FakeUpstream, slots: usize) -> Config {
    let mut c = config_for(&upstream.url());
    c.limits.max_concurrency = slots;
    c
}

// ---------------------------------------------------------------------------------------------
// 1. Many callers, few calls, exact vectors
// ---------------------------------------------------------------------------------------------

struct Variant {
    token_ids: bool,
    dimensions: Option<u32>,
    upstream_encoding: UpstreamEncoding,
}

/// 500 single-input callers at once, half asking for float and half for base64, with the
/// upstream slowed and 4 slots: few upstream calls, and every caller's vector is, as float32,
/// the one the fake computes for its input.
async fn five_hundred_callers(v: Variant) {
    const CALLERS: usize = 500;
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Delay(Duration::from_millis(100)));
    let mut config = config(&upstream, 4);
    config.embeddings.upstream_encoding = v.upstream_encoding;
    let proxy = start_proxy(config).await;
    let dims = v.dimensions.map_or(FAKE_DIMS, |d| d as usize);

    // Caller i: its own input, in float (even) or base64 (odd); token ids alternate between
    // the flat form `[..]` and the nested form `[[..]]`, both one input.
    let caller = |i: usize| -> (EmbeddingInput, &'static str, Value) {
        let (input, wire) = if v.token_ids {
            let ids = vec![i as u32, 1000 + i as u32, 42];
            let wire = if i % 4 < 2 {
                json!(ids)
            } else {
                json!([ids.clone()])
            };
            (EmbeddingInput::Tokens(ids), wire)
        } else {
            let s = format!("caller {i} asks about the weather in city number {i}");
            (text(s.clone()), json!(s))
        };
        let encoding = if i % 2 == 0 { "float" } else { "base64" };
        let mut body = json!({"model": MODEL, "input": wire, "encoding_format": encoding});
        if let Some(d) = v.dimensions {
            body["dimensions"] = json!(d);
        }
        (input, encoding, body)
    };

    let client = client();
    let url = embeddings_url(&proxy.url());
    let started = Instant::now();
    let replies = call_all(
        &client,
        (0..CALLERS)
            .map(|i| post_json(&url, &caller(i).2))
            .collect(),
    )
    .await;
    let elapsed = started.elapsed();

    for (i, reply) in replies.iter().enumerate() {
        let (input, encoding, _) = caller(i);
        assert_vectors(reply, std::slice::from_ref(&input), encoding, dims);
        assert_eq!(reply.json()["model"], MODEL);
        assert_eq!(
            reply.prompt_tokens(),
            u64::from(billed_tokens(MODEL, &input)),
            "caller {i}'s usage"
        );
        assert_eq!(reply.count("x-embedcar-inputs"), 1);
    }

    let calls = embedding_calls(&upstream);
    assert_eq!(upstream.embedding_inputs(), CALLERS, "each input sent once");
    assert!(
        calls.len() <= 40,
        "{} upstream calls for {CALLERS} callers in {elapsed:?}",
        calls.len()
    );
    assert!(upstream.peak_concurrency() <= 4, "the slot limit holds");
    let wanted = match v.upstream_encoding {
        UpstreamEncoding::Base64 => "base64",
        UpstreamEncoding::Float => "float",
    };
    let mut seen = HashSet::new();
    for (r, inputs) in &calls {
        let body = r.json().unwrap();
        assert_eq!(body["encoding_format"], wanted);
        assert_eq!(body["model"], MODEL);
        assert_eq!(
            body["dimensions"],
            v.dimensions.map_or(Value::Null, |d| json!(d))
        );
        seen.extend(inputs.iter().cloned());
    }
    assert_eq!(seen.len(), CALLERS, "every caller's input, none twice");

    // A sample compared with the fake's own direct reply to the same request: the batched
    // reply, and the same request again (now from the cache).
    for i in [0, 1, 2, 3, CALLERS - 1] {
        let (_, encoding, body) = caller(i);
        let direct = call(&client, post_json(&embeddings_url(&upstream.url()), &body)).await;
        let cached = call(&client, post_json(&url, &body)).await;
        assert_eq!(cached.count("x-embedcar-cache-hits"), 1);
        let d = direct.json();
        for t in [replies[i].json(), cached.json()] {
            assert_eq!(t["usage"], d["usage"]);
            assert_eq!(t["model"], d["model"]);
            assert_same_f32(
                &vectors(&t, encoding)[0],
                &vectors(&d, encoding)[0],
                &format!("caller {i} against the direct reply"),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_text_callers_make_few_calls_and_get_exact_vectors() {
    five_hundred_callers(Variant {
        token_ids: false,
        dimensions: None,
        upstream_encoding: UpstreamEncoding::Base64,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_text_callers_with_dimensions_get_exact_vectors() {
    five_hundred_callers(Variant {
        token_ids: false,
        dimensions: Some(16),
        upstream_encoding: UpstreamEncoding::Base64,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_token_id_callers_with_dimensions_get_exact_vectors() {
    five_hundred_callers(Variant {
        token_ids: true,
        dimensions: Some(5),
        upstream_encoding: UpstreamEncoding::Base64,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_token_id_callers_through_a_float_upstream_get_exact_vectors() {
    five_hundred_callers(Variant {
        token_ids: true,
        dimensions: None,
        upstream_encoding: UpstreamEncoding::Float,
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Identical inputs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_callers_sending_the_same_input_cause_one_upstream_input() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Delay(Duration::from_millis(100)));
    let proxy = start_proxy(config(&upstream, 8)).await;
    let input = text("everyone wants this one sentence embedded");
    let body = request_for(MODEL, std::slice::from_ref(&input));
    let url = embeddings_url(&proxy.url());

    let replies = call_all(
        &client(),
        (0..100).map(|_| post_json(&url, &body)).collect(),
    )
    .await;

    let mut shared = 0;
    for reply in &replies {
        assert_vectors(reply, std::slice::from_ref(&input), "float", FAKE_DIMS);
        assert_eq!(
            reply.prompt_tokens(),
            u64::from(billed_tokens(MODEL, &input)),
            "each caller is billed its own input, however it was served"
        );
        shared += reply.count("x-embedcar-coalesced") + reply.count("x-embedcar-cache-hits");
    }
    assert_eq!(upstream.embedding_calls(), 1);
    assert_eq!(upstream.embedding_inputs(), 1);
    assert_eq!(shared, 99, "all but the first joined it or found it cached");
    let joined = metric(&proxy, COALESCED).await + metric(&proxy, CACHE_HITS).await;
    assert_eq!(joined, 99.0);
    assert_eq!(metric(&proxy, INPUTS).await, 100.0);
}

// ---------------------------------------------------------------------------------------------
// 3. Tenants
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_credentials_never_share_an_upstream_call() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let tenants = [("a", "Bearer sk-tenant-a"), ("b", "Bearer sk-tenant-b")];
    let both = "a sentence both tenants send";

    // Each tenant: 20 callers with inputs of its own, and 3 callers with the shared sentence.
    let gate = hold_slots(&proxy, &upstream, 1).await;
    let mut reqs = Vec::new();
    let mut expected = Vec::new();
    for i in 0..23 {
        for (tenant, auth) in tenants {
            let input = if i < 20 {
                text(format!("{tenant}-{i}"))
            } else {
                text(both)
            };
            let req = post_json(&url, &request_for(MODEL, std::slice::from_ref(&input)));
            reqs.push(with_headers(req, &[("authorization", auth)]));
            expected.push(input);
        }
    }
    let pending = spawn_all(&client, reqs);
    // 20 own inputs + 1 shared sentence queued per tenant: the twins joined within a tenant.
    wait_metric(&proxy, QUEUE_DEPTH, 42.0).await;
    gate.release().await;
    for (reply, input) in join_all(pending).await.iter().zip(&expected) {
        assert_vectors(reply, std::slice::from_ref(input), "float", FAKE_DIMS);
    }

    let calls = embedding_calls(&upstream);
    assert_eq!(calls.len(), 2, "one merged call per tenant");
    let mut shared_sent = HashMap::new();
    for (r, inputs) in &calls {
        let auth = r.header("authorization").unwrap();
        let (tenant, _) = tenants.iter().find(|(_, a)| *a == auth).unwrap();
        assert_eq!(r.headers.get_all("authorization").iter().count(), 1);
        for input in inputs {
            let EmbeddingInput::Text(s) = input else {
                panic!("{input:?}")
            };
            if s == both {
                *shared_sent.entry(*tenant).or_insert(0) += 1;
            } else {
                assert!(s.starts_with(&format!("{tenant}-")), "{s} sent as {auth}");
            }
        }
    }
    assert_eq!(shared_sent, HashMap::from([("a", 1), ("b", 1)]));
}

#[tokio::test]
async fn tenants_never_share_cache_entries_unless_the_operator_allows_it() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 4)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let input = text("a sentence tenant A embedded first");
    let body = request_for(MODEL, std::slice::from_ref(&input));
    let ask = |headers: &'static [(&'static str, &'static str)]| {
        let req = with_headers(post_json(&url, &body), headers);
        let client = client.clone();
        async move { call(&client, req).await }
    };
    const A: &[(&str, &str)] = &[("authorization", "Bearer sk-tenant-a")];
    const B: &[(&str, &str)] = &[("authorization", "Bearer sk-tenant-b")];
    const A_OTHER_PROJECT: &[(&str, &str)] = &[
        ("authorization", "Bearer sk-tenant-a"),
        ("openai-project", "proj_other"),
    ];

    let a1 = ask(A).await;
    assert_eq!(a1.count("x-embedcar-cache-hits"), 0);
    let b1 = ask(B).await;
    assert_eq!(
        b1.count("x-embedcar-cache-hits"),
        0,
        "A's entry must not serve B"
    );
    let p1 = ask(A_OTHER_PROJECT).await;
    assert_eq!(p1.count("x-embedcar-cache-hits"), 0, "nor another project");
    let auths: Vec<_> = embedding_calls(&upstream)
        .iter()
        .map(|(r, _)| {
            (
                r.header("authorization").unwrap().to_string(),
                r.header("openai-project").map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        auths,
        vec![
            ("Bearer sk-tenant-a".to_string(), None),
            ("Bearer sk-tenant-b".to_string(), None),
            (
                "Bearer sk-tenant-a".to_string(),
                Some("proj_other".to_string())
            ),
        ]
    );
    // Now each has asked once: each is served from its own entry.
    for headers in [A, B, A_OTHER_PROJECT] {
        let again = ask(headers).await;
        assert_eq!(again.count("x-embedcar-cache-hits"), 1);
        assert_eq!(again.body, a1.body, "a hit answers exactly as the miss did");
    }
    assert_eq!(upstream.embedding_calls(), 3);

    // With sharing allowed, B is served from A's entry.
    let mut config = config(&upstream, 4);
    config.cache.share_across_credentials = true;
    let shared = start_proxy(config).await;
    let url = embeddings_url(&shared.url());
    let req = |auth: &str| with_headers(post_json(&url, &body), &[("authorization", auth)]);
    let a = call(&client, req("Bearer sk-tenant-a")).await;
    assert_eq!(a.count("x-embedcar-cache-hits"), 0);
    let b = call(&client, req("Bearer sk-tenant-b")).await;
    assert_eq!(b.count("x-embedcar-cache-hits"), 1);
    assert_eq!(b.body, a.body);
    assert_eq!(upstream.embedding_calls(), 4, "B cost no upstream call");
}

// ---------------------------------------------------------------------------------------------
// 4. Isolation of one bad input
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_over_the_token_limit_gets_a_400_before_batching_and_its_neighbours_succeed() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let good: Vec<EmbeddingInput> = (0..10)
        .map(|i| text(format!("a perfectly fine input {i}")))
        .collect();
    // 9000 cl100k tokens: over text-embedding-3-small's 8192.
    let huge = text("hello ".repeat(9000));
    assert!(billed_tokens(MODEL, &huge) > 8192);
    let beside_huge = text("sent beside the oversized input");

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let pending = spawn_all(
        &client,
        good.iter()
            .map(|g| post_json(&url, &request_for(MODEL, std::slice::from_ref(g))))
            .collect(),
    );
    let bad = tokio::time::timeout(
        Duration::from_secs(5),
        call(
            &client,
            post_json(
                &url,
                &request_for(MODEL, &[beside_huge.clone(), huge.clone()]),
            ),
        ),
    )
    .await
    .expect("refused at once, without waiting for a slot");
    // Refused while every slot is still busy: it never joined the queue.
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let e = bad.json()["error"].clone();
    assert_eq!(e["param"], "input", "{e}");
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    assert!(e["message"].as_str().unwrap().contains("8192"), "{e}");
    assert_eq!(bad.header("x-embedcar-error"), Some("invalid_request"));

    wait_metric(&proxy, QUEUE_DEPTH, 10.0).await;
    gate.release().await;
    for (reply, input) in join_all(pending).await.iter().zip(&good) {
        assert_vectors(reply, std::slice::from_ref(input), "float", FAKE_DIMS);
    }
    let calls = embedding_calls(&upstream);
    assert_eq!(calls.len(), 1, "the good callers still share one call");
    let sent: HashSet<_> = calls.iter().flat_map(|(_, i)| i.iter().cloned()).collect();
    assert_eq!(sent, good.iter().cloned().collect::<HashSet<_>>());
    assert!(
        !sent.contains(&beside_huge),
        "a refused request leaves nothing queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_the_upstream_refuses_fails_only_its_caller() {
    let upstream = FakeUpstream::start_with(FakeOptions {
        max_input_tokens: 5,
        ..Default::default()
    })
    .await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let good: Vec<EmbeddingInput> = (0..30).map(|i| text(format!("good input{i}"))).collect();
    // 20 words: over the fake's 5-token limit for a model embedcar has no tokenizer for, so
    // only the upstream can tell.
    let bad = text(
        (0..20)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" "),
    );

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let mut reqs: Vec<_> = good
        .iter()
        .map(|g| post_json(&url, &request_for(CUSTOM_MODEL, std::slice::from_ref(g))))
        .collect();
    reqs.insert(
        17,
        post_json(&url, &request_for(CUSTOM_MODEL, std::slice::from_ref(&bad))),
    );
    let pending = spawn_all(&client, reqs);
    wait_metric(&proxy, QUEUE_DEPTH, 31.0).await;
    gate.release().await;
    let mut replies = join_all(pending).await;
    let bad_reply = replies.remove(17);

    // The offender gets the upstream's own 400, as the upstream words it.
    assert_eq!(bad_reply.status, StatusCode::BAD_REQUEST);
    let direct = call(
        &client,
        post_json(
            &embeddings_url(&upstream.url()),
            &request_for(CUSTOM_MODEL, std::slice::from_ref(&bad)),
        ),
    )
    .await;
    assert_eq!(direct.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_reply.json(), direct.json());
    assert_eq!(bad_reply.header("x-embedcar-error"), None, "not embedcar's");
    // Everyone beside it succeeds.
    for (reply, input) in replies.iter().zip(&good) {
        assert_vectors(reply, std::slice::from_ref(input), "float", FAKE_DIMS);
    }

    let calls = embedding_calls(&upstream);
    assert_eq!(
        calls[0].1.len(),
        31,
        "all 31 inputs went out in one merged call"
    );
    assert!(calls[0].1.contains(&bad));
    assert!(metric(&proxy, SPLITS).await > 0.0);
    assert_eq!(
        upstream.embedding_inputs(),
        30,
        "each good input embedded once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_that_blames_the_whole_request_is_not_bisected_down_to_every_input() {
    // `dimensions` the upstream refuses: every part of the call fails alike, so there is no
    // offending input to find. Every caller must get the upstream's 400, and finding that out
    // must not cost an upstream call per input (2n - 1 calls, one after another, on one slot,
    // each against the rate limit, while every caller waits for the last).
    const CALLERS: usize = 32;
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let url = embeddings_url(&proxy.url());
    let body =
        |i: usize| json!({"model": MODEL, "input": format!("input {i}"), "dimensions": 70000});

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let pending = spawn_all(
        &client(),
        (0..CALLERS).map(|i| post_json(&url, &body(i))).collect(),
    );
    wait_metric(&proxy, QUEUE_DEPTH, CALLERS as f64).await;
    gate.release().await;
    let replies = join_all(pending).await;

    let direct = call(
        &client(),
        post_json(&embeddings_url(&upstream.url()), &body(0)),
    )
    .await;
    assert_eq!(direct.status, StatusCode::BAD_REQUEST);
    assert_eq!(direct.json()["error"]["param"], "dimensions");
    for r in &replies {
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json(), direct.json());
    }
    let calls = embedding_calls(&upstream).len() - 1;
    // Generous: any of "do not split when the error names a request field", "stop when both
    // halves fail alike" or "at most a logarithmic number of extra calls" passes.
    let bound = 2 * CALLERS.ilog2() as usize + 1;
    assert!(
        calls <= bound,
        "{calls} upstream calls to learn that {CALLERS} inputs share one request-level 400 \
         (bound {bound}); isolation splits: {}",
        metric(&proxy, SPLITS).await
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Callers who leave
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_leaves_no_input_sent_on_its_behalf() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let url = embeddings_url(&proxy.url());
    let alone = text("nobody waits for this any more");
    let twin = text("someone else still waits for this");

    let gate = hold_slots(&proxy, &upstream, 1).await;
    // Each caller on its own connection, so that leaving closes only its own.
    let leaver = spawn_all(
        &client(),
        vec![post_json(
            &url,
            &request_for(MODEL, std::slice::from_ref(&alone)),
        )],
    );
    let twin_leaver = spawn_all(
        &client(),
        vec![post_json(
            &url,
            &request_for(MODEL, std::slice::from_ref(&twin)),
        )],
    );
    let stayer = spawn_all(
        &client(),
        vec![post_json(
            &url,
            &request_for(MODEL, std::slice::from_ref(&twin)),
        )],
    );
    wait_metric(&proxy, QUEUE_DEPTH, 2.0).await;
    wait_metric(&proxy, COALESCED, 1.0).await;
    for task in leaver.into_iter().chain(twin_leaver) {
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
    }
    // embedcar sees both callers go (499) before the slot frees.
    wait_metric(
        &proxy,
        r#"embedcar_requests_total{method="POST",route="embeddings",status="499"}"#,
        2.0,
    )
    .await;
    gate.release().await;

    let stayed = join_all(stayer).await;
    assert_vectors(&stayed[0], std::slice::from_ref(&twin), "float", FAKE_DIMS);
    wait_metric(&proxy, ABANDONED, 1.0).await;
    wait_metric(&proxy, QUEUE_DEPTH, 0.0).await;
    let sent: Vec<_> = embedding_calls(&upstream)
        .into_iter()
        .flat_map(|(_, i)| i)
        .collect();
    assert_eq!(sent, vec![twin], "only the input someone still waited for");

    // The lane still works afterwards, and the abandoned input was not cached.
    let later = call(
        &client(),
        post_json(&url, &request_for(MODEL, std::slice::from_ref(&alone))),
    )
    .await;
    assert_vectors(&later, std::slice::from_ref(&alone), "float", FAKE_DIMS);
    assert_eq!(later.count("x-embedcar-cache-hits"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_deadline_passes_gets_a_504_and_its_input_is_not_sent() {
    let upstream = FakeUpstream::start().await;
    let mut config = config(&upstream, 1);
    config.limits.request_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config).await;
    let url = embeddings_url(&proxy.url());
    let input = text("waited too long");

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let started = Instant::now();
    let r = send(&client(), post_json(&url, &request_for(MODEL, &[input]))).await;
    let e = expect_openai_error(r, StatusCode::GATEWAY_TIMEOUT).await;
    assert_eq!(e["code"], "deadline_exceeded");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    gate.release().await;
    wait_metric(&proxy, ABANDONED, 1.0).await;
    assert!(embedding_calls(&upstream).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 6. Requests the engine leaves alone
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_request_with_an_unknown_field_reaches_the_upstream_byte_for_byte() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 4)).await;
    let raw = "{ \"input\" : [\"caf\\u00e9\", \"tea\"],\n  \"model\":\"text-embedding-3-small\",\
               \"new_param\": 1, \"dimensions\" :4 }";
    let req = |base: &str| {
        Request::post(embeddings_url(base))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-test")
            .body(embedcar::body::full(raw))
            .unwrap()
    };
    let through = call(&client(), req(&proxy.url())).await;
    assert_eq!(through.status, StatusCode::OK);
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.body, raw.as_bytes());
    assert_eq!(seen.uri, "/v1/embeddings");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(
        through.header("x-embedcar-inputs"),
        None,
        "passed through, not served by the engine"
    );

    let direct = call(&client(), req(&upstream.url())).await;
    assert_eq!(through.json(), direct.json());
}

#[tokio::test]
async fn with_the_engine_off_or_an_oversized_request_not_to_be_split_the_bytes_pass_through() {
    let upstream = FakeUpstream::start().await;
    let client = client();
    let raw_for = |inputs: usize| {
        let inputs: Vec<_> = (0..inputs).map(|i| text(format!("i{i}"))).collect();
        request_for(MODEL, &inputs).to_string()
    };
    let req = |base: &str, raw: &str| {
        Request::post(embeddings_url(base))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-test")
            .body(embedcar::body::full(raw.to_string()))
            .unwrap()
    };

    let mut off = config(&upstream, 4);
    off.embeddings.enabled = false;
    let proxy = start_proxy(off).await;
    let raw = raw_for(3);
    let r = call(&client, req(&proxy.url(), &raw)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-embedcar-inputs"), None);
    assert_eq!(upstream.requests().pop().unwrap().body, raw.as_bytes());

    // Over the per-call input cap with splitting off: the upstream judges it (and refuses).
    let mut whole = config(&upstream, 4);
    whole.embeddings.split_oversized = false;
    let proxy = start_proxy(whole).await;
    let raw = raw_for(2049);
    let r = call(&client, req(&proxy.url(), &raw)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2049"));
    assert_eq!(upstream.requests().pop().unwrap().body, raw.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// 7, 8. Size and order
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_five_thousand_input_request_comes_back_complete_and_in_order() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 4)).await;
    let inputs: Vec<_> = (0..5000)
        .map(|i| text(format!("item number {i}")))
        .collect();
    let mut body = request_for(MODEL, &inputs);
    body["encoding_format"] = json!("base64");

    let reply = call(&client(), post_json(&embeddings_url(&proxy.url()), &body)).await;
    assert_vectors(&reply, &inputs, "base64", FAKE_DIMS);
    assert_eq!(reply.count("x-embedcar-inputs"), 5000);
    let billed: u64 = inputs
        .iter()
        .map(|i| u64::from(billed_tokens(MODEL, i)))
        .sum();
    assert_eq!(reply.prompt_tokens(), billed);

    let calls = embedding_calls(&upstream);
    assert_eq!(calls.len(), 3, "5000 inputs in calls of at most 2048");
    assert!(calls.iter().all(|(_, i)| i.len() <= 2048));
    let sent: HashSet<_> = calls.iter().flat_map(|(_, i)| i.iter().cloned()).collect();
    assert_eq!(sent.len(), 5000);
}

#[tokio::test]
async fn upstream_calls_stay_under_the_token_cap() {
    let upstream = FakeUpstream::start().await;
    let mut config = config(&upstream, 4);
    config.embeddings.max_tokens_per_call = 40;
    let proxy = start_proxy(config).await;
    let inputs: Vec<_> = (0..20)
        .map(|i| {
            text(format!(
                "sentence {i} has roughly a dozen tokens in it, give or take"
            ))
        })
        .collect();
    let tokens = |i: &EmbeddingInput| u64::from(billed_tokens(MODEL, i));
    assert!(inputs.iter().all(|i| tokens(i) > 10 && tokens(i) <= 20));

    let reply = call(
        &client(),
        post_json(&embeddings_url(&proxy.url()), &request_for(MODEL, &inputs)),
    )
    .await;
    assert_vectors(&reply, &inputs, "float", FAKE_DIMS);
    assert_eq!(
        reply.prompt_tokens(),
        inputs.iter().map(tokens).sum::<u64>()
    );
    let calls = embedding_calls(&upstream);
    assert!(calls.len() >= 7, "{} calls", calls.len());
    for (_, sent) in &calls {
        assert!(sent.iter().map(tokens).sum::<u64>() <= 40, "{sent:?}");
    }
    assert_eq!(calls.iter().map(|(_, i)| i.len()).sum::<usize>(), 20);
}

/// OpenAI's cap on the tokens of one embeddings request, which the fake enforces by default.
const OPENAI_REQUEST_TOKENS: u64 = 300_000;

/// 40 distinct inputs of about 7,900 tokens each: every one under the per-input limit, together
/// over the per-request cap (about 316,000 tokens), with far fewer than 2048 inputs.
fn forty_long_inputs() -> Vec<EmbeddingInput> {
    (0..40)
        .map(|i| text(format!("input {i}:{}", " hello".repeat(7_900))))
        .collect()
}

#[tokio::test]
async fn a_request_over_the_token_cap_is_split_into_calls_under_it() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 4)).await;
    let inputs = forty_long_inputs();
    let tokens = |i: &EmbeddingInput| u64::from(billed_tokens(MODEL, i));
    assert!(inputs.iter().map(tokens).sum::<u64>() > OPENAI_REQUEST_TOKENS);

    let reply = call(
        &client(),
        post_json(&embeddings_url(&proxy.url()), &request_for(MODEL, &inputs)),
    )
    .await;

    assert_vectors(&reply, &inputs, "float", FAKE_DIMS);
    let calls = embedding_calls(&upstream);
    assert!(calls.len() >= 2, "{} calls", calls.len());
    for (_, sent) in &calls {
        let sent_tokens = sent.iter().map(tokens).sum::<u64>();
        assert!(
            sent_tokens <= OPENAI_REQUEST_TOKENS,
            "a call of {sent_tokens} tokens"
        );
    }
    assert_eq!(calls.iter().map(|(_, i)| i.len()).sum::<usize>(), 40);
}

#[tokio::test]
async fn with_splitting_off_a_request_over_the_token_cap_passes_through_whole() {
    let upstream = FakeUpstream::start().await;
    let mut whole = config(&upstream, 4);
    whole.embeddings.split_oversized = false;
    let proxy = start_proxy(whole).await;
    let raw = request_for(MODEL, &forty_long_inputs()).to_string();

    let r = call(
        &client(),
        Request::post(embeddings_url(&proxy.url()))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-test")
            .body(embedcar::body::full(raw.clone()))
            .unwrap(),
    )
    .await;

    // The upstream judges it, and refuses it as OpenAI would.
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.header("x-embedcar-inputs"), None);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "sent once, whole");
    assert_eq!(seen[0].body, raw.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_and_index_are_kept_for_a_256_string_batch_mixed_with_others() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    // 256 strings in a scrambled order with some repeated; every third one already cached,
    // and another caller sending an overlapping set in reverse at the same time.
    let inputs: Vec<_> = (0..256u32)
        .map(|i| text(format!("line {}", (i * 97) % 200)))
        .collect();
    let warm: Vec<_> = inputs.iter().step_by(3).cloned().collect();
    let other: Vec<_> = inputs.iter().rev().step_by(2).cloned().collect();
    let warmed = call(&client, post_json(&url, &request_for(MODEL, &warm))).await;
    assert_eq!(warmed.status, StatusCode::OK);

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let mut mine = request_for(MODEL, &inputs);
    mine["encoding_format"] = json!("base64");
    let pending = spawn_all(
        &client,
        vec![
            post_json(&url, &mine),
            post_json(&url, &request_for(MODEL, &other)),
        ],
    );
    // Queued: every distinct input not already cached (twins join, hits never queue).
    let warm_set: HashSet<_> = warm.iter().collect();
    let distinct: HashSet<_> = inputs.iter().chain(&other).collect();
    let queued = distinct.iter().filter(|i| !warm_set.contains(*i)).count();
    wait_metric(&proxy, QUEUE_DEPTH, queued as f64).await;
    gate.release().await;
    let replies = join_all(pending).await;

    assert_vectors(&replies[0], &inputs, "base64", FAKE_DIMS);
    assert_vectors(&replies[1], &other, "float", FAKE_DIMS);
    let hits = inputs.iter().filter(|i| warm_set.contains(i)).count();
    assert_eq!(replies[0].count("x-embedcar-cache-hits"), hits);
    assert_eq!(replies[0].count("x-embedcar-inputs"), 256);
    let billed: u64 = inputs
        .iter()
        .map(|i| u64::from(billed_tokens(MODEL, i)))
        .sum();
    assert_eq!(replies[0].prompt_tokens(), billed);
    assert_eq!(
        upstream.embedding_inputs(),
        distinct.len(),
        "each distinct input embedded once"
    );
    assert_eq!(
        upstream.embedding_calls(),
        2,
        "the warm-up, then both callers' misses in one call"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Cache
// ---------------------------------------------------------------------------------------------

/// With every upstream slot free, callers whose requests are ready at the same moment still
/// share one call: the dispatcher lets the runnable tasks go first, so when embedcar's CPU is
/// busy, inputs gather instead of each paying for a call. One worker thread makes "ready at the
/// same moment" exact: one task spawns the ten callers, so all ten are queued before any runs
/// (without the dispatcher's yield, the first caller's input would leave alone at once). The
/// worker's periodic maintenance, which also wakes yielded tasks, is turned off so that it
/// cannot fall in the middle of the ten by chance.
#[test]
fn callers_ready_at_the_same_moment_share_a_call_though_slots_are_free() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .event_interval(u32::MAX)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = FakeUpstream::start().await;
        let state = embedcar::AppState::new(config(&upstream, 256)).unwrap();
        let engine = state.engine.clone().expect("the engine is on by default");
        let ask = |input: &str| {
            let body = request_for(MODEL, &[text(input)]);
            post_json("http://embedcar/v1/embeddings", &body)
        };
        // The first request loads the tokenizer and opens the upstream connection.
        let warm = engine.handle(ask("warm-up"), EmbeddingsPath::OpenAi).await;
        assert_eq!(warm.unwrap().status(), StatusCode::OK);
        let before = upstream.embedding_calls();

        let spawner = engine.clone();
        let callers = tokio::spawn(async move {
            (0..10)
                .map(|i| {
                    let engine = spawner.clone();
                    let request = ask(&format!("caller {i}"));
                    tokio::spawn(
                        async move { engine.handle(request, EmbeddingsPath::OpenAi).await },
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for caller in callers {
            let response = caller.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_eq!(upstream.embedding_calls() - before, 1);
        assert_eq!(upstream.embedding_inputs(), 11);
    });
}

#[tokio::test]
async fn a_repeated_request_is_answered_from_the_cache_exactly_as_the_first_time() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 4)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let abc = [text("alpha one"), text("beta two"), text("gamma three")];

    let first = call(&client, post_json(&url, &request_for(MODEL, &abc))).await;
    assert_vectors(&first, &abc, "float", FAKE_DIMS);
    assert_eq!(first.count("x-embedcar-cache-hits"), 0);
    assert_eq!(upstream.embedding_calls(), 1);

    let again = call(&client, post_json(&url, &request_for(MODEL, &abc))).await;
    assert_eq!(again.count("x-embedcar-cache-hits"), 3);
    assert_eq!(
        again.body, first.body,
        "same vectors, same usage, same model"
    );
    assert_eq!(upstream.embedding_calls(), 1, "no upstream call");

    // In the other format, from the same entries.
    let mut b64 = request_for(MODEL, &abc);
    b64["encoding_format"] = json!("base64");
    let again = call(&client, post_json(&url, &b64)).await;
    assert_vectors(&again, &abc, "base64", FAKE_DIMS);
    assert_eq!(again.count("x-embedcar-cache-hits"), 3);
    assert_eq!(upstream.embedding_calls(), 1);

    // A partial hit sends only the misses.
    let mixed = [
        text("delta four"),
        abc[1].clone(),
        text("epsilon five"),
        abc[0].clone(),
    ];
    let partial = call(&client, post_json(&url, &request_for(MODEL, &mixed))).await;
    assert_vectors(&partial, &mixed, "float", FAKE_DIMS);
    assert_eq!(partial.count("x-embedcar-cache-hits"), 2);
    let calls = embedding_calls(&upstream);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].1, vec![mixed[0].clone(), mixed[2].clone()]);
    let tokens = |inputs: &[EmbeddingInput]| -> u64 {
        inputs
            .iter()
            .map(|i| u64::from(billed_tokens(MODEL, i)))
            .sum()
    };
    assert_eq!(partial.prompt_tokens(), tokens(&mixed));

    assert_eq!(metric(&proxy, CACHE_HITS).await, 8.0);
    let cached_tokens = 2 * tokens(&abc) + tokens(&mixed[1..2]) + tokens(&mixed[3..]);
    assert_eq!(
        metric(
            &proxy,
            r#"embedcar_embeddings_tokens_total{source="cache"}"#
        )
        .await,
        cached_tokens as f64
    );
    assert_eq!(
        metric(
            &proxy,
            r#"embedcar_embeddings_tokens_total{source="upstream"}"#
        )
        .await,
        (tokens(&abc) + tokens(&mixed[0..1]) + tokens(&mixed[2..3])) as f64
    );
    assert_eq!(
        metric(
            &proxy,
            r#"embedcar_upstream_requests_total{route="embeddings",status="200"}"#
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn with_the_cache_disabled_the_upstream_is_called_again() {
    let upstream = FakeUpstream::start().await;
    let mut config = config(&upstream, 4);
    config.cache.enabled = false;
    let proxy = start_proxy(config).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let inputs = [text("asked twice"), text("also asked twice")];
    for n in 1..=2 {
        let r = call(&client, post_json(&url, &request_for(MODEL, &inputs))).await;
        assert_vectors(&r, &inputs, "float", FAKE_DIMS);
        assert_eq!(r.count("x-embedcar-cache-hits"), 0);
        assert_eq!(upstream.embedding_calls(), n);
    }
}

#[tokio::test]
async fn the_caches_entries_and_bytes_are_in_the_metrics() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 4)).await;
    let inputs: Vec<_> = (0..7).map(|i| text(format!("kept {i}"))).collect();

    let r = call(
        &client(),
        post_json(&embeddings_url(&proxy.url()), &request_for(MODEL, &inputs)),
    )
    .await;

    assert_vectors(&r, &inputs, "float", FAKE_DIMS);
    assert_eq!(metric(&proxy, "embedcar_cache_entries").await, 7.0);
    assert!(metric(&proxy, "embedcar_cache_bytes").await > 0.0);
}

// ---------------------------------------------------------------------------------------------
// 10. Usage
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_callers_usage_equals_the_direct_reply_even_when_batched() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let requests: Vec<Value> = (0..12)
        .map(|i| {
            let inputs: Vec<_> = (0..=i % 4)
                .map(|j| {
                    text(format!(
                        "Caller {i}, part {j}: naïve café — 東京 {}",
                        "tokens ".repeat(i * j)
                    ))
                })
                .collect();
            request_for(MODEL, &inputs)
        })
        .collect();

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let pending = spawn_all(
        &client,
        requests.iter().map(|b| post_json(&url, b)).collect(),
    );
    wait_metric(&proxy, QUEUE_DEPTH, 30.0).await;
    gate.release().await;
    let replies = join_all(pending).await;
    assert_eq!(
        embedding_calls(&upstream).len(),
        1,
        "all merged into one call"
    );

    for (reply, body) in replies.iter().zip(&requests) {
        let direct = call(&client, post_json(&embeddings_url(&upstream.url()), body)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["usage"], direct.json()["usage"], "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_an_unknown_model_the_callers_usages_add_up_to_the_upstreams_totals() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let callers: Vec<Vec<EmbeddingInput>> = (0..10)
        .map(|i| {
            (0..=i % 3)
                .map(|j| text(format!("caller{i} part{j} {}", "word ".repeat(i + 3 * j))))
                .collect()
        })
        .collect();

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let pending = spawn_all(
        &client,
        callers
            .iter()
            .map(|inputs| post_json(&url, &request_for(CUSTOM_MODEL, inputs)))
            .collect(),
    );
    let total_inputs: usize = callers.iter().map(Vec::len).sum();
    wait_metric(&proxy, QUEUE_DEPTH, total_inputs as f64).await;
    gate.release().await;
    let replies = join_all(pending).await;

    let calls = embedding_calls(&upstream);
    assert_eq!(calls.len(), 1, "merged, so the total had to be shared out");
    // What the upstream reported: the fake's own count of what it was sent.
    let reported: u64 = calls
        .iter()
        .flat_map(|(_, inputs)| inputs)
        .map(|i| u64::from(billed_tokens(CUSTOM_MODEL, i)))
        .sum();
    let mut billed = 0;
    for (reply, inputs) in replies.iter().zip(&callers) {
        assert_vectors(reply, inputs, "float", FAKE_DIMS);
        assert_eq!(reply.json()["model"], CUSTOM_MODEL);
        billed += reply.prompt_tokens();
    }
    assert_eq!(billed, reported);
}

// ---------------------------------------------------------------------------------------------
// 11. Upstream errors
// ---------------------------------------------------------------------------------------------

/// Sends `n` distinct single-input callers into one merged call; the fake answers every
/// embeddings call with `behavior` until the rule is cleared. Returns the callers' replies.
async fn merged_call_answered_with(
    proxy: &Handle,
    upstream: &FakeUpstream,
    behavior: Behavior,
    n: usize,
) -> Vec<Reply> {
    let url = embeddings_url(&proxy.url());
    let gate = hold_slots(proxy, upstream, 1).await;
    upstream.push_rule(Rule::repeat(behavior, 1_000_000).on_path("/embeddings"));
    // Callers that wait 3 s, as a client's timeout hint says: a merged call keeps retrying
    // for its callers as long as one of them has time.
    let pending = spawn_all(
        &client(),
        (0..n)
            .map(|i| {
                let mut req = post_json(&url, &request_for(MODEL, &[text(format!("caller {i}"))]));
                req.headers_mut()
                    .insert("x-stainless-read-timeout", HeaderValue::from_static("3"));
                req
            })
            .collect(),
    );
    wait_metric(proxy, QUEUE_DEPTH, n as f64).await;
    gate.release().await;
    join_all(pending).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_reaches_every_caller_of_the_call_with_its_headers() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let limited = Behavior::openai_error(429)
        .with_header("retry-after", "1")
        .with_header("x-ratelimit-limit-requests", "3000")
        .with_header("x-ratelimit-remaining-requests", "0")
        .with_header("x-ratelimit-reset-requests", "1s");
    let Behavior::Status { body, .. } = &limited else {
        unreachable!()
    };
    let upstream_body: Value = serde_json::from_str(body).unwrap();

    let replies = merged_call_answered_with(&proxy, &upstream, limited.clone(), 6).await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.json(), upstream_body);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3000"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(r.header("x-ratelimit-reset-requests"), Some("1s"));
        assert_eq!(r.header("x-embedcar-error"), None, "the upstream's error");
    }
    // Not split: every attempt carried all six inputs.
    let calls = embedding_calls(&upstream);
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|(_, inputs)| inputs.len() == 6));
    assert_eq!(metric(&proxy, SPLITS).await, 0.0);
    assert_eq!(
        metric(
            &proxy,
            r#"embedcar_upstream_requests_total{route="embeddings",status="429"}"#
        )
        .await,
        calls.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_is_not_split_and_not_cached() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let replies =
        merged_call_answered_with(&proxy, &upstream, Behavior::openai_error(401), 5).await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    let calls = embedding_calls(&upstream);
    assert_eq!(calls.len(), 1, "one call, not split");
    assert_eq!(calls[0].1.len(), 5);
    assert_eq!(metric(&proxy, SPLITS).await, 0.0);

    // Nothing was kept from the failure: once the key works, the same input goes upstream.
    upstream.clear_rules();
    let input = text("caller 0");
    let again = call(
        &client(),
        post_json(
            &embeddings_url(&proxy.url()),
            &request_for(MODEL, std::slice::from_ref(&input)),
        ),
    )
    .await;
    assert_vectors(&again, std::slice::from_ref(&input), "float", FAKE_DIMS);
    assert_eq!(again.count("x-embedcar-cache-hits"), 0);
    assert_eq!(embedding_calls(&upstream).len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 12, 13. Azure, headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_path_is_batched_per_deployment_and_api_version() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let deployment = "text-embedding-3-small";
    let url = |version: &str| {
        format!(
            "{}/openai/deployments/{deployment}/embeddings?api-version={version}",
            proxy.url()
        )
    };
    let versions = ["2024-02-01", "2024-06-01"];
    let inputs: Vec<_> = (0..8).map(|i| text(format!("azure caller {i}"))).collect();

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let pending = spawn_all(
        &client(),
        inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let req = post_json(&url(versions[i % 2]), &json!({"input": input_json(input)}));
                with_headers(req, &[("api-key", "azure-key")])
            })
            .collect(),
    );
    wait_metric(&proxy, QUEUE_DEPTH, 8.0).await;
    gate.release().await;
    for (reply, input) in join_all(pending).await.iter().zip(&inputs) {
        assert_vectors(reply, std::slice::from_ref(input), "float", FAKE_DIMS);
        assert_eq!(reply.json()["model"], deployment);
        assert_eq!(
            reply.prompt_tokens(),
            u64::from(billed_tokens(deployment, input))
        );
    }

    let calls = embedding_calls(&upstream);
    assert_eq!(calls.len(), 2, "one call per api-version");
    for (r, sent) in &calls {
        assert_eq!(
            r.path(),
            format!("/openai/deployments/{deployment}/embeddings")
        );
        let version = r.uri.query().unwrap().strip_prefix("api-version=").unwrap();
        let parity = versions.iter().position(|v| *v == version).unwrap();
        let want: Vec<_> = inputs
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, x)| x.clone())
            .collect();
        assert_eq!(
            sent.iter().collect::<HashSet<_>>(),
            want.iter().collect::<HashSet<_>>()
        );
        assert_eq!(r.header("api-key"), Some("azure-key"));
        assert!(r.json().unwrap().get("model").is_none(), "no model added");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_headers_that_can_change_the_answer_separate_callers() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 1)).await;
    let url = embeddings_url(&proxy.url());
    let mut reqs = Vec::new();
    let mut groups: BTreeMap<&str, Vec<EmbeddingInput>> = BTreeMap::new();
    // Six callers differing only in per-request headers...
    for i in 0..6 {
        let input = text(format!("plain caller {i}"));
        let ua = format!("OpenAI/Python 1.{i}.0");
        let retry = i.to_string();
        let trace = format!("00-{:032x}-{:016x}-01", i + 1, i + 1);
        let id = format!("req-{i}");
        reqs.push(with_headers(
            post_json(&url, &request_for(MODEL, std::slice::from_ref(&input))),
            &[
                ("user-agent", &ua),
                ("x-stainless-retry-count", &retry),
                ("traceparent", &trace),
                ("x-request-id", &id),
            ],
        ));
        groups.entry("").or_default().push(input);
    }
    // ... and six differing in one that can (a beta feature flag).
    for i in 0..6 {
        let beta = ["assistants=v1", "assistants=v2"][i % 2];
        let input = text(format!("beta caller {i}"));
        reqs.push(with_headers(
            post_json(&url, &request_for(MODEL, std::slice::from_ref(&input))),
            &[("openai-beta", beta)],
        ));
        groups.entry(beta).or_default().push(input);
    }

    // ... and two with their own `user` (it shapes the bill and abuse tracking).
    for i in 0..2 {
        let input = text(format!("alice's input {i}"));
        let mut body = request_for(MODEL, std::slice::from_ref(&input));
        body["user"] = json!("alice");
        reqs.push(post_json(&url, &body));
        groups.entry("user alice").or_default().push(input);
    }

    let gate = hold_slots(&proxy, &upstream, 1).await;
    let pending = spawn_all(&client(), reqs);
    wait_metric(&proxy, QUEUE_DEPTH, 14.0).await;
    gate.release().await;
    for r in join_all(pending).await {
        assert_eq!(r.status, StatusCode::OK);
    }

    let calls = embedding_calls(&upstream);
    assert_eq!(
        calls.len(),
        4,
        "one call per openai-beta value and per user"
    );
    for (r, sent) in &calls {
        let body = r.json().unwrap();
        let group = match (r.header("openai-beta"), body["user"].as_str()) {
            (Some(beta), None) => beta,
            (None, Some("alice")) => "user alice",
            (None, None) => "",
            other => panic!("{other:?}"),
        };
        assert_eq!(
            sent.iter().collect::<HashSet<_>>(),
            groups[group].iter().collect::<HashSet<_>>(),
            "group {group:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 14. Invalid requests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_requests_get_openai_shaped_400s_without_an_upstream_call() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(config(&upstream, 4)).await;
    let client = client();
    let url = embeddings_url(&proxy.url());
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"model":"text-embedding-3-small"}"#, Some("input")),
        (r#"{"input":"no model"}"#, Some("model")),
        (
            r#"{"model":"text-embedding-3-small","input":""}"#,
            Some("input"),
        ),
        (
            r#"{"model":"text-embedding-3-small","input":[]}"#,
            Some("input"),
        ),
        (
            r#"{"model":"text-embedding-3-small","input":["a",1]}"#,
            Some("input"),
        ),
        (
            r#"{"model":"text-embedding-3-small","input":[[1],[]]}"#,
            Some("input"),
        ),
        (
            r#"{"model":"text-embedding-3-small","input":[-1]}"#,
            Some("input"),
        ),
        (
            r#"{"model":"text-embedding-3-small","input":"a","encoding_format":"int8"}"#,
            Some("encoding_format"),
        ),
        (
            r#"{"model":"text-embedding-3-small","input":"a","dimensions":0}"#,
            Some("dimensions"),
        ),
        ("this is not json", None),
    ];
    for (body, param) in cases {
        let req = Request::post(&url)
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-test")
            .body(embedcar::body::full(*body))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(
            r.headers()
                .get("x-embedcar-error")
                .and_then(|v| v.to_str().ok()),
            Some("invalid_request"),
            "{body}"
        );
        let e = expect_openai_error(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(
            e["param"],
            param.map_or(Value::Null, |p| json!(p)),
            "{body}"
        );
    }
    assert_eq!(upstream.request_count(), 0);
}
