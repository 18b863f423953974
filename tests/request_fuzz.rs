//! The embeddings request parser fed arbitrary bytes, arbitrary JSON and near-valid requests:
//! it never panics, it serves exactly the valid requests, leaves alone the ones with a field it
//! does not know, and every refusal is a 400 in OpenAI's error shape. Then the same kinds of
//! bodies end to end through a real embedcar in front of the fake upstream.
//!
//! Property tests (proptest) run from a fixed seed so that CI is repeatable. To explore further,
//! `PROPTEST_RNG_SEED=<u64>` picks another seed and `PROPTEST_CASES=<n>` sets every property's
//! case count (the end-to-end pass always sends the same number of bodies).

mod support;

use std::{
    cell::Cell,
    collections::HashMap,
    fmt::{self, Write as _},
};

use embedcar::{
    embeddings::request::{parse, EmbeddingsRequest, Encoding, Input, Parsed},
    errors::ProxyError,
};
use fake_openai::{
    decode_embedding, expected_embedding, EmbeddingInput, FakeOptions, FakeUpstream,
};
use futures_util::FutureExt;
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner},
};
use serde::{
    de::{MapAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::{json, value::RawValue, Map, Number, Value};
use support::harness::{body_bytes, client, config_for, start_proxy, TestClient};

const KNOWN: [&str; 5] = ["input", "model", "encoding_format", "dimensions", "user"];
/// The seed used unless PROPTEST_RNG_SEED gives another.
const SEED: u64 = 0x0e3b_edca_2f22_0001;

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if c.rng_seed == RngSeed::Random {
        c.rng_seed = RngSeed::Fixed(SEED);
    }
    // Failures print their shrunk input; no regression files are written into the tree.
    c.failure_persistence = None;
    c
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z ]{1,16}",
        2 => "\\PC{1,12}",
        1 => any::<String>(),
        1 => prop::sample::select(vec![
            "",
            " ",
            "\u{0}",
            "ünïcødé ✓",
            "😀😀",
            "\u{202e}rtl",
            "float",
            "base64",
            "text-embedding-3-small",
            "line\nbreak\t\"quoted\"\\",
        ])
        .prop_map(str::to_string),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..200_000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            0i128,
            1,
            -1,
            u32::MAX as i128,
            u32::MAX as i128 + 1,
            i64::MIN as i128,
            u64::MAX as i128,
        ])
        .prop_map(|n| match u64::try_from(n) {
            Ok(u) => Value::from(u),
            Err(_) => Value::from(n as i64),
        }),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![0.0, -0.0, 1.0, 1.5, 8.0, 1e300, -2.5e-8])
            .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
    ]
}

/// Any JSON value: scalars of every kind, then arrays and objects of them a few levels deep.
fn arb_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KNOWN.to_vec()).prop_map(str::to_string),
        2 => prop::sample::select(vec!["extra", "Input", "input ", "", "encoding", "stream"])
            .prop_map(str::to_string),
        1 => "\\PC{0,8}",
    ]
}

fn token() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..100_300, 1 => any::<u32>()]
}

/// A token id, or something that is not quite one.
fn token_ish() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => token().prop_map(Value::from),
        1 => number(),
        1 => prop::sample::select(vec![json!("1"), Value::Null, json!(true), json!([1])]),
    ]
}

fn input_value() -> BoxedStrategy<Value> {
    let tokens = || prop::collection::vec(token().prop_map(Value::from), 1..6);
    let not_quite_tokens = || prop::collection::vec(token_ish(), 0..3).prop_map(Value::Array);
    let odd = vec![json!(""), json!([]), json!([[]]), json!([""]), json!(null)];
    prop_oneof![
        4 => text().prop_map(Value::String),
        4 => prop::collection::vec(text().prop_map(Value::String), 1..5).prop_map(Value::Array),
        3 => tokens().prop_map(Value::Array),
        3 => prop::collection::vec(tokens().prop_map(Value::Array), 1..4).prop_map(Value::Array),
        1 => prop::collection::vec(token_ish(), 0..4).prop_map(Value::Array),
        1 => prop::collection::vec(not_quite_tokens(), 0..3).prop_map(Value::Array),
        1 => (text(), token()).prop_map(|(s, t)| json!([s, t])),
        1 => (token(), text()).prop_map(|(t, s)| json!([t, s])),
        1 => prop::sample::select(odd),
        1 => arb_json(),
    ]
    .boxed()
}

fn model_value() -> BoxedStrategy<Value> {
    let odd = vec![
        json!(""),
        Value::Null,
        json!(3),
        json!(["text-embedding-3-small"]),
    ];
    prop_oneof![
        6 => prop::sample::select(vec![
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-embedding-ada-002",
            "bge-small",
        ])
        .prop_map(Value::from),
        1 => text().prop_map(Value::String),
        1 => prop::sample::select(odd),
        1 => arb_json(),
    ]
    .boxed()
}

fn encoding_value() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => prop::sample::select(vec![json!("float"), json!("base64"), Value::Null]),
        1 => prop::sample::select(vec![json!("int8"), json!(""), json!("FLOAT"), json!(1)]),
        1 => arb_json(),
    ]
    .boxed()
}

fn dimensions_value() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (1u64..=64).prop_map(Value::from),
        2 => prop::sample::select(vec![
            json!(0),
            json!(-1),
            json!(1.5),
            json!(8.0),
            json!(70_000),
            json!(u32::MAX),
            json!(u32::MAX as u64 + 1),
            json!(u64::MAX),
            json!("8"),
            Value::Null,
        ]),
        1 => arb_json(),
    ]
    .boxed()
}

fn user_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => text().prop_map(Value::String),
        1 => prop::sample::select(vec![Value::Null, json!(7), json!({"id": "u"})]),
        1 => arb_json(),
    ]
    .boxed()
}

/// An object with the fields of an embeddings request, each present or not and each of the
/// right type or not, sometimes with an unknown field: valid, invalid and pass-through requests
/// all occur.
fn near_valid() -> BoxedStrategy<Value> {
    (
        prop::option::weighted(0.93, input_value()),
        prop::option::weighted(0.9, model_value()),
        prop::option::weighted(0.5, encoding_value()),
        prop::option::weighted(0.3, dimensions_value()),
        prop::option::weighted(0.25, user_value()),
        prop::option::weighted(0.12, (key(), arb_json())),
    )
        .prop_map(|(input, model, encoding, dimensions, user, extra)| {
            let mut m = Map::new();
            for (k, v) in [
                ("input", input),
                ("model", model),
                ("encoding_format", encoding),
                ("dimensions", dimensions),
                ("user", user),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
        .boxed()
}

/// A request the API accepts, in any of its forms and options.
fn valid() -> BoxedStrategy<Value> {
    let text = || "[a-z ]{0,15}[a-z]|\\PC{1,12}";
    let tokens = || prop::collection::vec(token(), 1..6);
    let input = prop_oneof![
        text().prop_map(Value::from),
        prop::collection::vec(text(), 1..5).prop_map(Value::from),
        tokens().prop_map(Value::from),
        prop::collection::vec(tokens(), 1..4).prop_map(Value::from),
    ];
    (
        input,
        prop::sample::select(vec![
            "text-embedding-3-small",
            "text-embedding-ada-002",
            "bge-small",
        ]),
        prop::option::of(prop::sample::select(vec!["float", "base64"])),
        prop::option::of(1u32..=64),
        prop::option::of("[a-z]{0,6}"),
    )
        .prop_map(|(input, model, encoding, dimensions, user)| {
            let mut m = Map::new();
            m.insert("input".into(), input);
            m.insert("model".into(), model.into());
            for (k, v) in [
                ("encoding_format", encoding.map(Value::from)),
                ("dimensions", dimensions.map(Value::from)),
                ("user", user.map(Value::from)),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
        .boxed()
}

/// JSON text no `serde_json::Value` can stand for, or spelled unusually: numbers out of range,
/// lone surrogates, escaped and duplicate keys, deep nesting, odd whitespace, trailing bytes.
fn odd_text() -> BoxedStrategy<Vec<u8>> {
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let keys = prop::sample::select(vec![
        "\"input\"",
        "\"inp\\u0075t\"",
        "\"model\"",
        "\"encoding_format\"",
        "\"dimensions\"",
        "\"user\"",
        "\"extra\"",
        "\"\\ud800\"",
    ]);
    let raw_values = prop::sample::select(vec![
        "1e400".to_string(),
        "-1e400".to_string(),
        "-0".to_string(),
        "1E2".to_string(),
        "4294967295".to_string(),
        "4294967296".to_string(),
        "18446744073709551616".to_string(),
        "[1e400]".to_string(),
        "[1, 2.0]".to_string(),
        "\"\\ud800\"".to_string(),
        "[\"\\ud83d\\ude00\", \"\\udc00\"]".to_string(),
        "\"\\u0000\"".to_string(),
        "\"text-embedding-3-small\"".to_string(),
        "\"a\"".to_string(),
        "[[1,2],[3]]".to_string(),
        deep(20),
        deep(200),
        deep(2000),
    ]);
    let value = prop_oneof![
        2 => raw_values,
        1 => near_valid().prop_map(|v| v["input"].to_string()),
        1 => arb_json().prop_map(|v| v.to_string()),
    ];
    let ws = prop::sample::select(vec!["", " ", "\n\t", "\r\n  "]);
    (
        prop::collection::vec((keys, ws.clone(), value), 0..5),
        ws,
        prop::sample::select(vec!["", "", "", " ", "x", "}", "{}", "\u{feff}"]),
        any::<bool>(),
    )
        .prop_map(|(entries, ws, trailing, bom)| {
            let mut s = String::new();
            if bom {
                s.push('\u{feff}');
            }
            s.push('{');
            for (i, (k, w, v)) in entries.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write!(s, "{w}{k}{w}:{w}{v}{ws}").unwrap();
            }
            s.push('}');
            s.push_str(trailing);
            s.into_bytes()
        })
        .boxed()
}

/// A serialized near-valid request with a few bytes deleted, inserted, replaced or cut off.
fn mutated() -> BoxedStrategy<Vec<u8>> {
    let edit = (
        0u8..4,
        any::<prop::sample::Index>(),
        any::<u8>(),
        prop::sample::select(b"{}[]\":,\\ 01-.eu".to_vec()),
    );
    (near_valid(), prop::collection::vec(edit, 1..4))
        .prop_map(|(v, edits)| {
            let mut b = v.to_string().into_bytes();
            for (op, at, byte, json_byte) in edits {
                let i = at.index(b.len() + 1);
                match op {
                    0 if i < b.len() => {
                        b.remove(i);
                    }
                    1 => b.insert(i, json_byte),
                    2 if i < b.len() => b[i] = byte,
                    3 => b.truncate(i),
                    _ => b.insert(i, byte),
                }
            }
            b
        })
        .boxed()
}

/// Bytes drawn mostly from JSON's own alphabet, so that some of them are almost JSON.
fn json_alphabet() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(b"{}[]\":, \n0123456789-.eE+truefalsnl\\u".to_vec()),
            1 => any::<u8>(),
        ],
        0..64,
    )
}

// ---------------------------------------------------------------------------------------------
// What the parser should say: the API's rules, written out independently of src/
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Expect {
    Engine(EmbeddingsRequest),
    PassThrough,
    /// Refused, naming one of these params (none: the body as a whole).
    Invalid(Vec<&'static str>),
}

/// A JSON object's members in order, duplicates included, each value as its raw text.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Object)
    }
}

/// The rules: the body must be one JSON object; of a repeated member the last counts (as in
/// serde_json's and Python's parsers); a member the engine does not know means pass-through,
/// whatever the others hold (values are not even read); otherwise each field is read (a value
/// with no `serde_json::Value` form, like 1e400 or a lone surrogate, is invalid) and checked.
fn expect(body: &[u8], model_required: bool) -> Expect {
    let Ok(Members(members)) = serde_json::from_slice::<Members>(body) else {
        return Expect::Invalid(vec![]);
    };
    let last: HashMap<String, Box<RawValue>> = members.into_iter().collect();
    if last.keys().any(|k| !KNOWN.contains(&k.as_str())) {
        return Expect::PassThrough;
    }
    let mut fields = Map::new();
    let mut unreadable = Vec::new();
    for (k, raw) in &last {
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(v) => {
                fields.insert(k.clone(), v);
            }
            Err(_) => unreadable.push(*KNOWN.iter().find(|n| *n == k).unwrap()),
        }
    }
    match expect_fields(&fields, model_required) {
        Ok(r) if unreadable.is_empty() => Expect::Engine(r),
        Ok(_) => Expect::Invalid(unreadable),
        // A field that could not be read may be reported as missing too.
        Err(mut params) => {
            params.extend(unreadable);
            Expect::Invalid(params)
        }
    }
}

/// Every field checked on its own; all the invalid ones are returned.
fn expect_fields(
    m: &Map<String, Value>,
    model_required: bool,
) -> Result<EmbeddingsRequest, Vec<&'static str>> {
    let get = |k: &str| m.get(k).filter(|v| !v.is_null());
    let mut bad = Vec::new();
    let inputs = match get("input").and_then(expect_inputs) {
        Some(i) => i,
        None => {
            bad.push("input");
            vec![]
        }
    };
    let model = match get("model") {
        None if model_required => {
            bad.push("model");
            None
        }
        None => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => {
            bad.push("model");
            None
        }
    };
    let encoding = match get("encoding_format") {
        None => Encoding::Float,
        Some(v) if v == "float" => Encoding::Float,
        Some(v) if v == "base64" => Encoding::Base64,
        Some(_) => {
            bad.push("encoding_format");
            Encoding::Float
        }
    };
    let dimensions = match get("dimensions") {
        None => None,
        Some(v) => match v.as_u64().and_then(|d| u32::try_from(d).ok()) {
            Some(d) if d >= 1 => Some(d),
            _ => {
                bad.push("dimensions");
                None
            }
        },
    };
    let user = match get("user") {
        None => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => {
            bad.push("user");
            None
        }
    };
    if bad.is_empty() {
        Ok(EmbeddingsRequest {
            inputs,
            model,
            encoding,
            dimensions,
            user,
        })
    } else {
        Err(bad)
    }
}

/// A non-empty string; or a non-empty array of all non-empty strings, of all u32 token ids, or
/// of all non-empty arrays of u32 token ids.
fn expect_inputs(v: &Value) -> Option<Vec<Input>> {
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match v {
        Value::String(s) if !s.is_empty() => Some(vec![Input::Text(s.clone())]),
        Value::Array(a) if !a.is_empty() => {
            if a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty())) {
                Some(
                    a.iter()
                        .map(|x| Input::Text(x.as_str().unwrap().into()))
                        .collect(),
                )
            } else if a.iter().all(Value::is_number) {
                Some(vec![Input::Tokens(ids(a)?)])
            } else if a
                .iter()
                .all(|x| x.as_array().is_some_and(|t| !t.is_empty()))
            {
                a.iter()
                    .map(|x| ids(x.as_array().unwrap()).map(Input::Tokens))
                    .collect()
            } else {
                None
            }
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    engine: Cell<usize>,
    pass_through: Cell<usize>,
    invalid: Cell<usize>,
}

fn bump(c: &Cell<usize>) {
    c.set(c.get() + 1);
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// A refusal is a 400 `invalid_request_error` in OpenAI's shape, also once rendered.
fn check_refusal(e: ProxyError, body: &[u8], allowed: &[&str]) -> Result<(), TestCaseError> {
    let shown = || String::from_utf8_lossy(body).into_owned();
    let (message, param) = match &e {
        ProxyError::InvalidRequest { message, param } => (message.clone(), param.clone()),
        other => {
            return Err(fail(format!(
                "refused with {other:?}, not InvalidRequest: {}",
                shown()
            )))
        }
    };
    prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    prop_assert!(!message.is_empty());
    match &param {
        None => prop_assert!(
            allowed.is_empty(),
            "no param, expected one of {:?}: {}",
            allowed,
            shown()
        ),
        Some(p) => prop_assert!(
            allowed.contains(&p.as_str()),
            "param {} not among {:?}: {}",
            p,
            allowed,
            shown()
        ),
    }
    let r = e.into_response();
    prop_assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    prop_assert_eq!(
        r.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    let bytes = r
        .into_body()
        .collect()
        .now_or_never()
        .expect("a full body is ready at once")
        .expect("a full body cannot fail")
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| fail(format!("not JSON: {e}")))?;
    let keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    prop_assert_eq!(keys, vec!["error"]);
    let err = v["error"].as_object().unwrap();
    let mut fields: Vec<&str> = err.keys().map(String::as_str).collect();
    fields.sort_unstable();
    prop_assert_eq!(fields, vec!["code", "message", "param", "type"]);
    prop_assert_eq!(&err["message"], &Value::String(message));
    prop_assert_eq!(&err["type"], "invalid_request_error");
    prop_assert_eq!(&err["code"], "invalid_request");
    prop_assert_eq!(&err["param"], &param.map_or(Value::Null, Value::String));
    Ok(())
}

fn check_body(body: &[u8], tally: &Tally) -> Result<(), TestCaseError> {
    for model_required in [true, false] {
        let got = parse(body, model_required);
        let shown = || String::from_utf8_lossy(body).into_owned();
        match (expect(body, model_required), got) {
            (Expect::Engine(want), Ok(Parsed::Engine(r))) => {
                prop_assert_eq!(&r, &want, "{}", shown());
                prop_assert!(!r.inputs.is_empty());
                let non_empty = r.inputs.iter().all(|i| match i {
                    Input::Text(s) => !s.is_empty(),
                    Input::Tokens(t) => !t.is_empty(),
                });
                prop_assert!(non_empty);
                if model_required {
                    prop_assert!(r.model.as_deref().is_some_and(|m| !m.is_empty()));
                    bump(&tally.engine);
                }
            }
            (Expect::PassThrough, Ok(Parsed::PassThrough)) => {
                if model_required {
                    bump(&tally.pass_through);
                }
            }
            (Expect::Invalid(params), Err(e)) => {
                check_refusal(e, body, &params)?;
                if model_required {
                    bump(&tally.invalid);
                }
            }
            (want, got) => {
                let body = shown();
                return Err(fail(format!(
                    "model_required={model_required}: expected {want:?}, got {got:?}\nbody: {body}"
                )));
            }
        }
    }
    Ok(())
}

/// How a strategy's bodies fared (with `model_required`), as shares of all its cases.
#[derive(Debug)]
struct Shares {
    engine: f64,
    pass_through: f64,
    refused: f64,
}

/// Runs `strategy` through the parser `cases` times (PROPTEST_CASES overrides).
fn run(name: &str, cases: u32, strategy: impl Strategy<Value = Vec<u8>>) -> Shares {
    let tally = Tally::default();
    let mut runner = TestRunner::new(config(cases));
    if let Err(e) = runner.run(&strategy, |body| check_body(&body, &tally)) {
        panic!("{name}: {e}");
    }
    let (engine, pass, refused) = (
        tally.engine.get(),
        tally.pass_through.get(),
        tally.invalid.get(),
    );
    eprintln!("{name}: {cases} cases: engine {engine}, pass-through {pass}, refused {refused}");
    let total = (engine + pass + refused).max(1) as f64;
    Shares {
        engine: engine as f64 / total,
        pass_through: pass as f64 / total,
        refused: refused as f64 / total,
    }
}

#[test]
fn arbitrary_bytes_never_panic_and_are_refused_with_openais_400() {
    let s = run("bytes", 1000, prop::collection::vec(any::<u8>(), 0..256));
    assert_eq!(s.refused, 1.0, "{s:?}");
    run("json-alphabet bytes", 1000, json_alphabet());
}

#[test]
fn arbitrary_json_bodies_are_served_passed_through_or_refused_as_promised() {
    let s = run(
        "arbitrary JSON",
        1500,
        arb_json().prop_map(|v| v.to_string().into_bytes()),
    );
    assert!(s.pass_through > 0.1 && s.refused > 0.5, "{s:?}");
}

#[test]
fn near_valid_requests_are_served_passed_through_or_refused_as_promised() {
    let s = run(
        "near-valid objects",
        2500,
        near_valid().prop_map(|v| v.to_string().into_bytes()),
    );
    // The generator reaches all three outcomes, each often.
    assert!(
        s.engine > 0.2 && s.pass_through > 0.03 && s.refused > 0.3,
        "{s:?}"
    );
}

#[test]
fn valid_requests_are_all_served() {
    let s = run(
        "valid requests",
        1000,
        valid().prop_map(|v| v.to_string().into_bytes()),
    );
    assert_eq!(s.engine, 1.0, "{s:?}");
}

#[test]
fn unusual_json_text_and_mutated_requests_never_panic() {
    let s = run("odd JSON text", 1200, odd_text());
    assert!(s.pass_through > 0.02 && s.refused > 0.5, "{s:?}");
    run("mutated requests", 1200, mutated());
}

#[test]
fn an_unknown_field_passes_through_whatever_the_known_ones_hold() {
    // What the parser promises for a request with a field it does not know: not its business.
    for body in [
        r#"{"input":"","model":"m","new":1}"#,
        r#"{"input":[-1],"encoding_format":"int8","dimensions":0,"future_param":{}}"#,
        r#"{"x":null}"#,
        r#"{"input":"a","model":"m","extra":1e400}"#,
        r#"{"input":1e400,"model":"m","extra":1}"#,
    ] {
        assert!(
            matches!(parse(body.as_bytes(), true), Ok(Parsed::PassThrough)),
            "{body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

struct Reply {
    status: StatusCode,
    embedcar_error: Option<String>,
    body: Vec<u8>,
}

async fn post(client: &TestClient, url: &str, body: Vec<u8>) -> Result<Reply, String> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .body(embedcar::body::full(body))
        .unwrap();
    let r = client
        .request(req)
        .await
        .map_err(|e| format!("{url}: no reply: {e:?}"))?;
    let status = r.status();
    let embedcar_error = r
        .headers()
        .get(embedcar::errors::ERROR_HEADER)
        .map(|v| v.to_str().unwrap().to_string());
    Ok(Reply {
        status,
        embedcar_error,
        body: body_bytes(r).await.to_vec(),
    })
}

/// OpenAI's error shape: `{"error": {"message": string, "type": string, "param", "code"}}`,
/// `param` and `code` a string or null (the API itself sends null codes).
fn openai_error(r: &Reply) -> Result<Map<String, Value>, String> {
    let v: Value =
        serde_json::from_slice(&r.body).map_err(|e| format!("error body not JSON: {e}"))?;
    let e = v
        .get("error")
        .and_then(Value::as_object)
        .ok_or(format!("no error object: {v}"))?;
    let ok = e
        .get("message")
        .and_then(Value::as_str)
        .is_some_and(|m| !m.is_empty())
        && e.get("type").is_some_and(Value::is_string)
        && e.get("param").is_some_and(|p| p.is_string() || p.is_null())
        && e.get("code").is_some_and(|c| c.is_string() || c.is_null());
    if ok {
        Ok(e.clone())
    } else {
        Err(format!("not OpenAI's error shape: {v}"))
    }
}

/// A 200 with a list of embeddings, one per input, in order; returns the decoded vectors.
fn embeddings_list(
    r: &Reply,
    encoding: Option<Encoding>,
) -> Result<(Value, Vec<Vec<f32>>), String> {
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("reply not JSON: {e}"))?;
    if v["object"] != "list" || !v["model"].is_string() || !v["usage"]["prompt_tokens"].is_u64() {
        return Err(format!("not an embeddings list: {v}"));
    }
    let data = v["data"].as_array().ok_or("no data")?;
    let mut vectors = Vec::new();
    for (i, d) in data.iter().enumerate() {
        if d["object"] != "embedding" || d["index"] != i {
            return Err(format!("item {i} out of shape: {d}"));
        }
        match (encoding, &d["embedding"]) {
            (Some(Encoding::Base64), Value::String(_))
            | (Some(Encoding::Float), Value::Array(_))
            | (None, _) => {}
            (e, got) => return Err(format!("asked for {e:?}, got {got}")),
        }
        vectors.push(decode_embedding(&d["embedding"]).ok_or(format!("undecodable item {i}"))?);
    }
    Ok((v, vectors))
}

/// Checks one body's reply from embedcar against the parser's verdict and the fake's own reply.
/// `deployment`: sent to Azure's path for that deployment, where the body needs no model.
fn judge(
    body: &[u8],
    deployment: Option<&str>,
    direct: &Reply,
    via: &Reply,
) -> Result<&'static str, String> {
    match parse(body, deployment.is_none()) {
        Err(e) => {
            let (message, param) = match e {
                ProxyError::InvalidRequest { message, param } => (message, param),
                other => return Err(format!("parser refused with {other:?}")),
            };
            if via.status != StatusCode::BAD_REQUEST
                || via.embedcar_error.as_deref() != Some("invalid_request")
            {
                return Err(format!(
                    "refused locally, but embedcar said {} ({:?})",
                    via.status, via.embedcar_error
                ));
            }
            let err = openai_error(via)?;
            if err["message"] != message.as_str()
                || err["param"] != param.map_or(Value::Null, Value::String)
            {
                return Err(format!("another refusal than the parser's: {err:?}"));
            }
            Ok("refused by embedcar")
        }
        Ok(Parsed::PassThrough) => {
            if via.status != direct.status || via.body != direct.body {
                return Err(format!(
                    "passed through, but embedcar said {} {} where the upstream says {} {}",
                    via.status,
                    String::from_utf8_lossy(&via.body),
                    direct.status,
                    String::from_utf8_lossy(&direct.body)
                ));
            }
            if via.status.is_success() {
                embeddings_list(via, None)?;
            } else {
                openai_error(via)?;
            }
            Ok("passed through")
        }
        Ok(Parsed::Engine(r)) => {
            if !direct.status.is_success() {
                // The upstream refuses what embedcar accepted (dimensions over its limit, an
                // input too long): the same status, in OpenAI's shape, from either of them.
                if via.status != direct.status {
                    return Err(format!(
                        "upstream says {}, embedcar {}",
                        direct.status, via.status
                    ));
                }
                openai_error(via)?;
                return Ok("engine, refused upstream");
            }
            if via.status != StatusCode::OK {
                return Err(format!(
                    "upstream serves it, embedcar said {} {}",
                    via.status,
                    String::from_utf8_lossy(&via.body)
                ));
            }
            let (got, vectors) = embeddings_list(via, Some(r.encoding))?;
            let (want, want_vectors) = embeddings_list(direct, Some(r.encoding))?;
            if vectors.len() != r.inputs.len() || vectors != want_vectors {
                return Err(format!(
                    "vectors differ from the upstream's: {got} vs {want}"
                ));
            }
            // The fake's vectors are a pure function of the input and length.
            let dims = r
                .dimensions
                .map_or(FakeOptions::default().dims, |d| d as usize);
            for (input, v) in r.inputs.iter().zip(&vectors) {
                let input = match input {
                    Input::Text(s) => EmbeddingInput::Text(s.clone()),
                    Input::Tokens(t) => EmbeddingInput::Tokens(t.clone()),
                };
                if *v != expected_embedding(&input, dims) {
                    return Err(format!("wrong vector for {input:?}"));
                }
            }
            if got["model"] != want["model"]
                || got["usage"]["total_tokens"] != got["usage"]["prompt_tokens"]
            {
                return Err(format!("model or usage out of shape: {got} vs {want}"));
            }
            // Usage is exact where embedcar can count (OpenAI's tokenizer, token ids); for other
            // models' text it is the upstream's count shared out among merged callers.
            let exact = r
                .model
                .as_deref()
                .or(deployment)
                .is_some_and(embedcar::embeddings::tokens::uses_cl100k)
                || r.inputs.iter().all(|i| matches!(i, Input::Tokens(_)));
            if exact && got["usage"] != want["usage"] {
                return Err(format!(
                    "usage {} where the upstream says {}",
                    got["usage"], want["usage"]
                ));
            }
            Ok("served by the engine")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_every_reply_is_embeddings_or_an_openai_error() {
    const BODIES: usize = 400;
    const AT_ONCE: usize = 16;
    let upstream = FakeUpstream::start_with(FakeOptions {
        record_requests: false,
        ..FakeOptions::default()
    })
    .await;
    let proxy = start_proxy(config_for(&upstream.url())).await;
    // Every fourth body goes to Azure's path, with a deployment named like an OpenAI model or
    // not, where the body needs no model.
    let target = |i: usize| match i % 8 {
        3 => Some("my-text-embedding-3-small"),
        7 => Some("emb-small"),
        _ => None,
    };
    let path = |deployment: Option<&str>| match deployment {
        None => "/v1/embeddings".to_string(),
        Some(d) => format!("/openai/deployments/{d}/embeddings?api-version=2024-02-01"),
    };

    // Mostly near-valid requests (they reach the engine and the upstream), some of every other
    // kind; drawn from the fixed seed, so every run sends the same bodies.
    let strategy = prop_oneof![
        6 => valid().prop_map(|v| v.to_string().into_bytes()),
        6 => near_valid().prop_map(|v| v.to_string().into_bytes()),
        1 => arb_json().prop_map(|v| v.to_string().into_bytes()),
        1 => odd_text(),
        1 => mutated(),
        1 => prop::collection::vec(any::<u8>(), 0..128),
    ];
    let mut runner = TestRunner::new(config(BODIES as u32));
    let bodies: Vec<Vec<u8>> = (0..BODIES)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();

    let client = client();
    let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
    let mut failures = Vec::new();
    let numbered: Vec<(usize, Vec<u8>)> = bodies.into_iter().enumerate().collect();
    for chunk in numbered.chunks(AT_ONCE) {
        // A chunk's bodies go to embedcar at the same time, so that they batch and coalesce.
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(i, body)| {
                let deployment = target(i);
                let direct = format!("{}{}", upstream.url(), path(deployment));
                let proxied = format!("{}{}", proxy.url(), path(deployment));
                let client = client.clone();
                tokio::spawn(async move {
                    let d = post(&client, &direct, body.clone()).await;
                    let v = post(&client, &proxied, body.clone()).await;
                    let verdict = match (d, v) {
                        (Ok(d), Ok(v)) => judge(&body, deployment, &d, &v),
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    };
                    (body, verdict)
                })
            })
            .collect();
        for t in tasks {
            let (body, verdict) = t.await.expect("request task");
            match verdict {
                Ok(kind) => *outcomes.entry(kind).or_default() += 1,
                Err(why) => {
                    failures.push(format!("{why}\n  body: {}", String::from_utf8_lossy(&body)))
                }
            }
        }
    }
    eprintln!("end to end: {BODIES} bodies: {outcomes:?}");
    assert!(
        failures.is_empty(),
        "{} of {BODIES} bodies failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        outcomes.get("served by the engine").copied().unwrap_or(0) > BODIES / 4,
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("refused by embedcar").copied().unwrap_or(0) > BODIES / 10,
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("passed through").copied().unwrap_or(0) > 10,
        "{outcomes:?}"
    );

    // After all that, an ordinary request is served as ever.
    let after = post(
        &client,
        &format!("{}/v1/embeddings", proxy.url()),
        br#"{"input":["after the fuzz","second"],"model":"text-embedding-3-small"}"#.to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(after.status, StatusCode::OK);
    let (_, vectors) = embeddings_list(&after, Some(Encoding::Float)).unwrap();
    assert_eq!(vectors[0], expected_embedding(&"after the fuzz".into(), 8));
    assert_eq!(vectors[1], expected_embedding(&"second".into(), 8));
}
