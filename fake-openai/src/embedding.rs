//! What the fake answers for an embeddings input, as pure functions a test uses to check a
//! proxied (batched, cached, re-encoded) answer: the vector, the tokens billed, the input's forms,
//! base64.

use serde_json::Value;

/// One embeddings input, as the API accepts it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EmbeddingInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl From<&str> for EmbeddingInput {
    fn from(s: &str) -> Self {
        EmbeddingInput::Text(s.to_string())
    }
}

impl From<String> for EmbeddingInput {
    fn from(s: String) -> Self {
        EmbeddingInput::Text(s)
    }
}

impl From<Vec<u32>> for EmbeddingInput {
    fn from(t: Vec<u32>) -> Self {
        EmbeddingInput::Tokens(t)
    }
}

/// The vector the fake returns for one input: deterministic, a pure function of (input, dims),
/// values in [-1, 1], finite, not all equal. Tests compare proxied results with this.
///
/// How: FNV-1a over the input (text and token arrays are hashed in separate domains, so `"1"`
/// and `[1]` differ) seeds a splitmix64 stream; each component is uniform in [-1, 1) and the
/// vector is scaled to unit length like OpenAI's (so cosine similarity behaves). Only exactly
/// rounded IEEE operations are used, so the result is the same on every platform. Because the
/// scaling is the last step, a shorter `dims` gives a re-normalised prefix of a longer one, as
/// OpenAI's `dimensions` parameter does.
pub fn expected_embedding(input: &EmbeddingInput, dims: usize) -> Vec<f32> {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut feed = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    };
    match input {
        EmbeddingInput::Text(s) => {
            feed(b'T');
            s.bytes().for_each(&mut feed);
        }
        EmbeddingInput::Tokens(t) => {
            feed(b'K');
            t.iter().flat_map(|x| x.to_le_bytes()).for_each(&mut feed);
        }
    }
    // Two 24-bit components per splitmix64 word, each exactly `k / 2^23 - 1` in [-1, 1), then
    // one multiplication by the reciprocal norm: cheap, because the benchmarks run this fake on
    // one core beside their load generator, at tens of thousands of vectors a second.
    let unit = |bits: u64| bits as f32 * (1.0 / (1u32 << 23) as f32) - 1.0;
    let mut state = h;
    let mut raw: Vec<f32> = Vec::with_capacity(dims + 1);
    while raw.len() < dims {
        let x = splitmix64(&mut state);
        raw.push(unit(x >> 40));
        raw.push(unit((x >> 16) & 0xff_ffff));
    }
    raw.truncate(dims);
    let norm = raw
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    let mut out = raw;
    if norm > 0.0 {
        let inverse = 1.0 / norm;
        for v in &mut out {
            *v = (f64::from(*v) * inverse) as f32;
        }
    }
    // Guarantee "not all equal" for dims >= 2 (astronomically unlikely to trigger).
    if out.len() >= 2 && out.iter().all(|v| *v == out[0]) {
        out[0] = if out[0] == 0.0 { 0.5 } else { -out[0] };
    }
    out
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Tokens the fake bills for `input` under `model`: like OpenAI, cl100k_base for OpenAI's
/// embedding models (so a proxy's exact per-caller usage can be compared with the direct
/// reply), and [`fake_token_count`]'s word count for any other model (a tokenizer the proxy
/// cannot know, as with an OpenAI-compatible server's own models).
pub fn billed_tokens(model: &str, input: &EmbeddingInput) -> u32 {
    match input {
        EmbeddingInput::Text(s)
            if model.contains("text-embedding-3") || model.contains("text-embedding-ada-002") =>
        {
            let n = tiktoken_rs::cl100k_base_singleton()
                .encode_ordinary(s)
                .len();
            n.min(u32::MAX as usize) as u32
        }
        _ => fake_token_count(input),
    }
}

/// Count "tokens" the fake's way for models it has no tokenizer for (whitespace-separated words
/// for text, length for token arrays; at least 1). Not a real tokenizer on purpose: tests that
/// check the proxy's own usage accounting need to tell the two apart.
pub fn fake_token_count(input: &EmbeddingInput) -> u32 {
    let n = match input {
        EmbeddingInput::Text(s) => s.split_whitespace().count(),
        EmbeddingInput::Tokens(t) => t.len(),
    };
    n.max(1).min(u32::MAX as usize) as u32
}

/// Parses an embeddings request's `input` the way the fake (and OpenAI) accept it: a string, an
/// array of strings, an array of token ids, or an array of token-id arrays. Empty strings, empty
/// arrays, mixed arrays and non-u32 numbers are errors. The error is a message for a 400.
pub fn parse_embedding_input(input: &Value) -> Result<Vec<EmbeddingInput>, String> {
    const BAD: &str = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.";
    let token = |v: &Value| {
        v.as_u64()
            .filter(|n| *n <= u64::from(u32::MAX))
            .map(|n| n as u32)
    };
    match input {
        Value::String(s) if !s.is_empty() => Ok(vec![EmbeddingInput::Text(s.clone())]),
        Value::Array(items) if !items.is_empty() => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(EmbeddingInput::Text(s.clone())),
                    _ => Err(BAD.to_string()),
                })
                .collect(),
            Value::Number(_) => items
                .iter()
                .map(|v| token(v).ok_or_else(|| BAD.to_string()))
                .collect::<Result<Vec<u32>, String>>()
                .map(|t| vec![EmbeddingInput::Tokens(t)]),
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(inner) if !inner.is_empty() => inner
                        .iter()
                        .map(|v| token(v).ok_or_else(|| BAD.to_string()))
                        .collect::<Result<Vec<u32>, String>>()
                        .map(EmbeddingInput::Tokens),
                    _ => Err(BAD.to_string()),
                })
                .collect(),
            _ => Err(BAD.to_string()),
        },
        _ => Err(BAD.to_string()),
    }
}

/// Standard base64 (RFC 4648 alphabet, with `=` padding), as OpenAI uses for
/// `encoding_format: "base64"`. Hand-rolled because `base64` is not a dependency of the crate.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets = |n: u32| {
        [
            ALPHABET[(n >> 18) as usize & 63],
            ALPHABET[(n >> 12) as usize & 63],
            ALPHABET[(n >> 6) as usize & 63],
            ALPHABET[n as usize & 63],
        ]
    };
    // Bytes, not chars (pushing a `char` encodes it as UTF-8 each time), and whole 3-byte groups
    // without per-byte checks: the benchmarks run this fake on one core beside their load
    // generator, at tens of thousands of 6 KiB vectors a second.
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    let mut groups = data.chunks_exact(3);
    for g in &mut groups {
        let n = (u32::from(g[0]) << 16) | (u32::from(g[1]) << 8) | u32::from(g[2]);
        out.extend_from_slice(&sextets(n));
    }
    match *groups.remainder() {
        [a] => {
            let s = sextets(u32::from(a) << 16);
            out.extend_from_slice(&[s[0], s[1], b'=', b'=']);
        }
        [a, b] => {
            let s = sextets((u32::from(a) << 16) | (u32::from(b) << 8));
            out.extend_from_slice(&[s[0], s[1], s[2], b'=']);
        }
        _ => {}
    }
    String::from_utf8(out).expect("the base64 alphabet is ASCII")
}

/// Strict inverse of [`base64_encode`]: `None` on a bad length, a bad character or bad padding.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.as_bytes();
    if s.len() & 3 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, q) in s.chunks(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for c in &q[..4 - pad] {
            n = (n << 6) | val(*c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Decodes one `embedding` value from a reply: a float array, or a base64 string of
/// little-endian f32. `None` if it is neither (or a float does not fit f32 exactly-ish).
pub fn decode_embedding(v: &Value) -> Option<Vec<f32>> {
    match v {
        Value::Array(items) => items.iter().map(|x| x.as_f64().map(|f| f as f32)).collect(),
        Value::String(s) => {
            let bytes = base64_decode(s)?;
            if bytes.len() % 4 != 0 {
                return None;
            }
            Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        _ => None,
    }
}
