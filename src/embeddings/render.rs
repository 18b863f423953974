//! Vectors in and out: reading the upstream's reply (base64 or float) into float32, and writing
//! each caller's reply in the format it asked for.
//!
//! Vectors are held as float32, which is what the models produce and what base64 carries
//! exactly. A caller asking for `base64` gets the little-endian float32 bytes; one asking for
//! `float` gets the shortest decimal text that parses back to the same float32. The official
//! Python and Node clients ask for base64 by default and the Node client decodes it without
//! checking, so getting this wrong would corrupt vectors silently.

use std::{borrow::Cow, io::Write as _};

use serde::{de, Deserialize, Deserializer};

use super::{float_text, request::Encoding};

/// The parts of an upstream embeddings reply the engine uses. Base64 vectors are borrowed from
/// the reply body, not copied out of it.
#[derive(Debug, Deserialize)]
pub struct UpstreamReply<'a> {
    #[serde(borrow)]
    pub data: Vec<UpstreamDatum<'a>>,
    pub model: String,
    #[serde(default)]
    pub usage: Option<UpstreamUsage>,
}

#[derive(Debug, Deserialize)]
pub struct UpstreamDatum<'a> {
    pub index: usize,
    #[serde(borrow)]
    pub embedding: UpstreamVector<'a>,
}

#[derive(Debug)]
pub enum UpstreamVector<'a> {
    /// The string's bytes: base64 is ASCII, so checking them as UTF-8 first would be wasted.
    Base64(Cow<'a, [u8]>),
    Floats(Vec<f32>),
}

/// By hand rather than `#[serde(untagged)]`: an untagged enum buffers the value first (a copy
/// of 8 KiB of base64, or a boxed value per float), where a visitor takes the string as a
/// borrow of the body and the numbers straight into the vector.
impl<'de: 'a, 'a> Deserialize<'de> for UpstreamVector<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = UpstreamVector<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a base64 string or an array of numbers")
            }

            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(UpstreamVector::Base64(Cow::Borrowed(v)))
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(UpstreamVector::Base64(Cow::Owned(v.to_owned())))
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(UpstreamVector::Base64(Cow::Borrowed(v.as_bytes())))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(UpstreamVector::Base64(Cow::Owned(v.as_bytes().to_owned())))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(f) = seq.next_element::<f32>()? {
                    v.push(f);
                }
                Ok(UpstreamVector::Floats(v))
            }
        }
        // As bytes: serde_json then hands over a string's raw bytes (escapes undone) without
        // validating them as UTF-8, and still reads an array as a sequence.
        d.deserialize_bytes(Visitor)
    }
}

#[derive(Debug, Deserialize)]
pub struct UpstreamUsage {
    pub prompt_tokens: u64,
}

impl UpstreamVector<'_> {
    pub fn into_f32(self) -> Result<Vec<f32>, String> {
        match self {
            UpstreamVector::Floats(v) => Ok(v),
            UpstreamVector::Base64(s) => decode_f32(&s),
        }
    }
}

/// Standard base64 of little-endian float32s, decoded (SIMD) straight into the vector's own
/// memory: no byte buffer in between, and no zeroing of memory about to be overwritten.
fn decode_f32(text: &[u8]) -> Result<Vec<f32>, String> {
    let invalid = |e: base64_simd::Error| format!("invalid base64 embedding: {e}");
    let len = base64_simd::STANDARD
        .decoded_length(text)
        .map_err(invalid)?;
    if len % 4 != 0 {
        return Err(format!("base64 embedding of {len} bytes is not float32"));
    }
    let mut vector: Vec<f32> = Vec::with_capacity(len / 4);
    let spare = vector.spare_capacity_mut();
    // SAFETY: the spare capacity holds `len / 4` float32s, that is `len` bytes, and a byte view
    // of the same memory needs no stricter alignment. Nothing reads it as floats until set_len.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(), len)
    };
    let written = base64_simd::STANDARD
        .decode(text, base64_simd::Out::from_uninit_slice(bytes))
        .map_err(invalid)?
        .len();
    if written != len {
        return Err(format!(
            "base64 embedding decoded to {written} bytes, not {len}"
        ));
    }
    // SAFETY: the decoder initialised all `len` bytes, which are `len / 4` float32s (any bit
    // pattern is a float).
    unsafe { vector.set_len(len / 4) };
    // The bytes are little-endian; a no-op on little-endian machines.
    for f in &mut vector {
        *f = f32::from_bits(u32::from_le(f.to_bits()));
    }
    Ok(vector)
}

/// An upstream reply, checked: one vector per input in input order, the model as the upstream
/// named it, and the token total it reported.
#[derive(Debug)]
pub struct ParsedReply {
    pub vectors: Vec<Vec<f32>>,
    pub model: String,
    pub prompt_tokens: Option<u64>,
}

/// Parses an upstream reply for `expected` inputs.
pub fn parse_reply(body: &[u8], expected: usize) -> Result<ParsedReply, String> {
    let reply: UpstreamReply =
        serde_json::from_slice(body).map_err(|e| format!("not an embeddings reply: {e}"))?;
    if reply.data.len() != expected {
        return Err(format!(
            "{} embeddings for {expected} inputs",
            reply.data.len()
        ));
    }
    let mut vectors: Vec<Option<Vec<f32>>> = (0..expected).map(|_| None).collect();
    for datum in reply.data {
        let slot = vectors
            .get_mut(datum.index)
            .ok_or_else(|| format!("index {} out of range", datum.index))?;
        if slot.is_some() {
            return Err(format!("index {} appears twice", datum.index));
        }
        *slot = Some(datum.embedding.into_f32()?);
    }
    let vectors = vectors
        .into_iter()
        .map(|v| v.ok_or_else(|| "an index is missing".to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ParsedReply {
        vectors,
        model: reply.model,
        prompt_tokens: reply.usage.map(|u| u.prompt_tokens),
    })
}

/// Writes one caller's reply: `{"object":"list","data":[...],"model":...,"usage":{...}}`, with
/// `data` in the caller's input order and `index` counting from 0, as the API does.
pub fn render_reply<'a>(
    vectors: impl ExactSizeIterator<Item = &'a [f32]> + Clone,
    encoding: Encoding,
    model: &str,
    prompt_tokens: u64,
) -> Vec<u8> {
    // Sized once up front: a reply is mostly vector text, and growing an 8 KiB buffer by
    // doubling copies it several times.
    let text: usize = vectors
        .clone()
        .map(|v| match encoding {
            Encoding::Float => float_text::reserve_for(v.len()),
            Encoding::Base64 => (v.len() * 4).div_ceil(3) * 4 + 2,
        })
        .sum();
    let mut out = Vec::with_capacity(128 + model.len() * 2 + vectors.len() * 64 + text);
    out.extend_from_slice(br#"{"object":"list","data":["#);
    for (index, vector) in vectors.enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"object":"embedding","index":"#);
        let _ = write!(out, "{index}");
        out.extend_from_slice(br#","embedding":"#);
        match encoding {
            Encoding::Float => write_floats(&mut out, vector),
            Encoding::Base64 => write_base64(&mut out, vector),
        }
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"model":"#);
    // serde_json escapes the model name exactly as JSON needs.
    out.extend_from_slice(
        serde_json::to_string(model)
            .unwrap_or_else(|_| "\"\"".into())
            .as_bytes(),
    );
    let _ = write!(
        out,
        r#","usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#
    );
    out
}

/// `[f, f, ...]` with each float the shortest text that round-trips to the same float32, as
/// zmij writes it (`float_text` writes the same bytes about four times as fast). JSON has no NaN
/// or infinity; a model never produces them, and if an upstream did, `null` says so rather than
/// inventing a number.
pub fn write_floats(out: &mut Vec<u8>, vector: &[f32]) {
    float_text::write_json_array(out, vector);
}

/// `"..."`: the little-endian float32 bytes, standard base64 with padding, encoded (SIMD)
/// straight from the vector's memory.
pub fn write_base64(out: &mut Vec<u8>, vector: &[f32]) {
    #[cfg(target_endian = "little")]
    let bytes: &[u8] = bytemuck::cast_slice(vector);
    #[cfg(not(target_endian = "little"))]
    let bytes: &[u8] = &vector
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect::<Vec<u8>>();
    let len = base64_simd::STANDARD.encoded_length(bytes.len());
    out.reserve(len + 2);
    out.push(b'"');
    let start = out.len();
    let written = base64_simd::STANDARD
        .encode(
            bytes,
            base64_simd::Out::from_uninit_slice(&mut out.spare_capacity_mut()[..len]),
        )
        .len();
    debug_assert_eq!(written, len);
    // SAFETY: the encoder initialised `written` bytes at the start of the spare capacity
    // (reserved above, so no reallocation happened in between).
    unsafe { out.set_len(start + written) };
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<f32> {
        vec![
            0.1,
            -0.0069292834,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            3.4028235e38,
            1e-7,
            0.0,
            -0.0,
            0.33333334,
        ]
    }

    #[test]
    fn float_text_parses_back_to_the_same_float32() {
        let v = sample();
        let mut out = Vec::new();
        write_floats(&mut out, &v);
        let parsed: Vec<f64> = serde_json::from_slice(&out).unwrap();
        let back: Vec<f32> = parsed.iter().map(|&f| f as f32).collect();
        assert_eq!(
            back.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn float_text_is_zmijs_and_null_for_non_finite_values() {
        let mut v = sample();
        v.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5, 100.0]);
        let mut out = Vec::new();
        write_floats(&mut out, &v);
        let mut buf = zmij::Buffer::new();
        let expected: Vec<String> = v
            .iter()
            .map(|f| match f.is_finite() {
                true => buf.format_finite(*f).to_string(),
                false => "null".to_string(),
            })
            .collect();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("[{}]", expected.join(","))
        );
    }

    #[test]
    fn base64_is_little_endian_float32_and_reads_back() {
        let v = sample();
        let mut out = Vec::new();
        write_base64(&mut out, &v);
        let s: String = serde_json::from_slice(&out).unwrap();
        let bytes = base64_simd::STANDARD.decode_to_vec(&s).unwrap();
        assert_eq!(&bytes[0..4], &0.1f32.to_le_bytes());
        let back = UpstreamVector::Base64(s.into_bytes().into())
            .into_f32()
            .unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn a_reply_has_openais_shape_in_the_callers_order() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 4.0];
        let body = render_reply(
            [&a[..], &b[..]].into_iter(),
            Encoding::Float,
            "text-embedding-3-small",
            7,
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "text-embedding-3-small");
        assert_eq!(v["usage"]["prompt_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], 7);
        assert_eq!(v["data"][0]["index"], 0);
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][1]["embedding"][0], 3.0);
        assert_eq!(v["data"][0]["object"], "embedding");
    }

    #[test]
    fn upstream_replies_are_checked_and_put_in_input_order() {
        let body = br#"{"object":"list","model":"m","usage":{"prompt_tokens":3,"total_tokens":3},
            "data":[{"object":"embedding","index":1,"embedding":[2.0]},
                    {"object":"embedding","index":0,"embedding":"AACAPw=="}]}"#;
        let reply = parse_reply(body, 2).unwrap();
        assert_eq!(reply.vectors, vec![vec![1.0], vec![2.0]]);
        assert_eq!(reply.model, "m");
        assert_eq!(reply.prompt_tokens, Some(3));
        assert!(parse_reply(body, 3).is_err());
        assert!(parse_reply(
            br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[1]}],"model":"m"}"#,
            2
        )
        .is_err());
        assert!(parse_reply(
            br#"{"data":[{"index":0,"embedding":"AAA"}],"model":"m"}"#,
            1
        )
        .is_err());
        assert!(parse_reply(b"{\"data\":[", 1).is_err());
        // An escaped string cannot be borrowed from the body; it is read all the same.
        let escaped = br#"{"data":[{"index":0,"embedding":"AACAPw\u003d\u003d"}],"model":"m"}"#;
        assert_eq!(parse_reply(escaped, 1).unwrap().vectors, vec![vec![1.0]]);
        // Two bytes are not a float32; a character outside the alphabet is not base64.
        assert!(parse_reply(
            br#"{"data":[{"index":0,"embedding":"AAA="}],"model":"m"}"#,
            1
        )
        .is_err());
        assert!(parse_reply(
            br#"{"data":[{"index":0,"embedding":"AA*A"}],"model":"m"}"#,
            1
        )
        .is_err());
    }
}
