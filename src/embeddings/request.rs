//! Reading a caller's embeddings request: every input form the API accepts, the fields that
//! shape the answer, and the decision to leave a request alone.
//!
//! A request with a field the engine does not know (a parameter the API gained after this was
//! written) is not the engine's to touch: it is forwarded verbatim. A request that is not valid
//! is refused here, with the 400 OpenAI gives, so it costs no upstream call and no rate budget.

use serde::{de, Deserialize, Deserializer};
use serde_json::{value::RawValue, Value};

use crate::http::errors::ProxyError;

/// One input: text, or the token ids of a text. Serializes back to the API's own form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

/// How the caller wants its vectors written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub inputs: Vec<Input>,
    pub model: Option<String>,
    pub encoding: Encoding,
    pub dimensions: Option<u32>,
    pub user: Option<String>,
}

#[derive(Debug)]
pub enum Parsed {
    /// The engine can serve this.
    Engine(EmbeddingsRequest),
    /// A field the engine does not know: forward the original bytes as they are.
    PassThrough,
}

fn invalid(message: impl Into<String>, param: Option<&str>) -> ProxyError {
    ProxyError::InvalidRequest {
        message: message.into(),
        param: param.map(str::to_string),
    }
}

/// OpenAI's wording for an input of the wrong shape.
fn invalid_input() -> ProxyError {
    invalid(
        "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
        Some("input"),
    )
}

/// The top-level fields of a request body, each still raw: a struct read in one pass, with no
/// map of owned names built only to be looked up five times. A repeated field keeps its last
/// value, as a JSON object read into a map would.
#[derive(Default)]
struct Fields<'a> {
    input: Option<&'a RawValue>,
    model: Option<&'a RawValue>,
    encoding_format: Option<&'a RawValue>,
    dimensions: Option<&'a RawValue>,
    user: Option<&'a RawValue>,
    /// A field the engine does not know was present.
    unknown: bool,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        match name {
            "input" => self.input,
            "model" => self.model,
            "encoding_format" => self.encoding_format,
            "dimensions" => self.dimensions,
            "user" => self.user,
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: de::MapAccess<'de>>(self, mut map: M) -> Result<Fields<'de>, M::Error> {
                let mut fields = Fields::default();
                while let Some(name) = map.next_key::<FieldName>()? {
                    let slot = match name {
                        FieldName::Input => &mut fields.input,
                        FieldName::Model => &mut fields.model,
                        FieldName::EncodingFormat => &mut fields.encoding_format,
                        FieldName::Dimensions => &mut fields.dimensions,
                        FieldName::User => &mut fields.user,
                        FieldName::Unknown => {
                            // Read as raw JSON, not skipped: that checks its strings are UTF-8,
                            // so a body that is not JSON is refused rather than forwarded.
                            fields.unknown = true;
                            map.next_value::<&RawValue>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(fields)
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A top-level field name, matched without being copied.
enum FieldName {
    Input,
    Model,
    EncodingFormat,
    Dimensions,
    User,
    Unknown,
}

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = FieldName;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<FieldName, E> {
                Ok(match name {
                    "input" => FieldName::Input,
                    "model" => FieldName::Model,
                    "encoding_format" => FieldName::EncodingFormat,
                    "dimensions" => FieldName::Dimensions,
                    "user" => FieldName::User,
                    _ => FieldName::Unknown,
                })
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Parses a request body. `model_required` is false on Azure's deployment paths, where the
/// deployment names the model.
pub fn parse(body: &[u8], model_required: bool) -> Result<Parsed, ProxyError> {
    let fields: Fields = serde_json::from_slice(body).map_err(|_| {
        invalid(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON object.",
            None,
        )
    })?;
    if fields.unknown {
        return Ok(Parsed::PassThrough);
    }

    let field = |name: &str| -> Result<Option<Value>, ProxyError> {
        match fields.get(name) {
            None => Ok(None),
            Some(raw) => {
                let v: Value = serde_json::from_str(raw.get())
                    .map_err(|_| invalid(format!("'{name}' is invalid"), Some(name)))?;
                Ok(if v.is_null() { None } else { Some(v) })
            }
        }
    };

    let inputs = match field("input")? {
        None => return Err(invalid("'input' is a required property", Some("input"))),
        Some(v) => parse_inputs(v)?,
    };
    let model = match field("model")? {
        None if model_required => {
            return Err(invalid("you must provide a model parameter", Some("model")))
        }
        None => None,
        Some(Value::String(m)) if !m.is_empty() => Some(m),
        Some(_) => return Err(invalid("'model' must be a non-empty string", Some("model"))),
    };
    let encoding = match field("encoding_format")? {
        None => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(other) => {
            return Err(invalid(
                format!(
                    "{} is not one of ['float', 'base64'] - 'encoding_format'",
                    quoted(&other)
                ),
                Some("encoding_format"),
            ))
        }
    };
    let dimensions = match field("dimensions")? {
        None => None,
        Some(v) => match v.as_u64() {
            Some(d) if d >= 1 && d <= u64::from(u32::MAX) => Some(d as u32),
            _ => {
                return Err(invalid(
                    format!(
                        "{} is not a valid value for 'dimensions': expected a positive integer",
                        quoted(&v)
                    ),
                    Some("dimensions"),
                ))
            }
        },
    };
    let user = match field("user")? {
        None => None,
        Some(Value::String(u)) => Some(u),
        Some(_) => return Err(invalid("'user' must be a string", Some("user"))),
    };
    Ok(Parsed::Engine(EmbeddingsRequest {
        inputs,
        model,
        encoding,
        dimensions,
        user,
    }))
}

/// A string, an array of strings, an array of token ids, or an array of token-id arrays. Empty
/// strings, empty arrays and mixed arrays are refused, as the API refuses them.
fn parse_inputs(v: Value) -> Result<Vec<Input>, ProxyError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(vec![Input::Text(s)]),
        Value::Array(items) if !items.is_empty() => match &items[0] {
            Value::String(_) => items
                .into_iter()
                .map(|i| match i {
                    Value::String(s) if !s.is_empty() => Ok(Input::Text(s)),
                    _ => Err(invalid_input()),
                })
                .collect(),
            Value::Number(_) => Ok(vec![Input::Tokens(token_ids(&items)?)]),
            Value::Array(_) => items
                .iter()
                .map(|i| match i {
                    Value::Array(ids) if !ids.is_empty() => Ok(Input::Tokens(token_ids(ids)?)),
                    _ => Err(invalid_input()),
                })
                .collect(),
            _ => Err(invalid_input()),
        },
        _ => Err(invalid_input()),
    }
}

/// A caller's value for an error message, the way OpenAI quotes it (`'int8'`), and cut short:
/// an error must not echo a request body back.
fn quoted(v: &Value) -> String {
    const MAX_CHARS: usize = 40;
    let text = match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    };
    if text.chars().count() <= MAX_CHARS {
        text
    } else {
        let cut: String = text.chars().take(MAX_CHARS).collect();
        format!("{cut}...")
    }
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ProxyError> {
    items
        .iter()
        .map(|i| {
            i.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(invalid_input)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(body: &str) -> EmbeddingsRequest {
        match parse(body.as_bytes(), true) {
            Ok(Parsed::Engine(r)) => r,
            other => panic!("{body}: {other:?}"),
        }
    }

    fn rejected(body: &str) -> (String, Option<String>) {
        match parse(body.as_bytes(), true) {
            Err(ProxyError::InvalidRequest { message, param }) => (message, param),
            other => panic!("{body}: expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn every_input_form_is_understood() {
        let t = |s: &str| Input::Text(s.into());
        assert_eq!(engine(r#"{"input":"a","model":"m"}"#).inputs, vec![t("a")]);
        assert_eq!(
            engine(r#"{"input":["a","b"],"model":"m"}"#).inputs,
            vec![t("a"), t("b")]
        );
        assert_eq!(
            engine(r#"{"input":[1,2,3],"model":"m"}"#).inputs,
            vec![Input::Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            engine(r#"{"input":[[1],[2,3]],"model":"m"}"#).inputs,
            vec![Input::Tokens(vec![1]), Input::Tokens(vec![2, 3])]
        );
    }

    #[test]
    fn options_are_read() {
        let r = engine(
            r#"{"input":"a","model":"m","encoding_format":"base64","dimensions":256,"user":"u1"}"#,
        );
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.encoding, Encoding::Base64);
        assert_eq!(r.dimensions, Some(256));
        assert_eq!(r.user.as_deref(), Some("u1"));
        let r = engine(r#"{"input":"a","model":"m","encoding_format":null}"#);
        assert_eq!(r.encoding, Encoding::Float);
    }

    #[test]
    fn an_unknown_field_means_pass_through() {
        let p = parse(br#"{"input":"a","model":"m","new_param":true}"#, true).unwrap();
        assert!(matches!(p, Parsed::PassThrough));
        let p = parse(
            br#"{"input":"a","extra":{"deep":[1,{"x":null}]},"model":"m"}"#,
            true,
        );
        assert!(matches!(p, Ok(Parsed::PassThrough)));
    }

    #[test]
    fn field_names_are_read_as_json_reads_them() {
        // An escaped name is the same name; a repeated field keeps its last value.
        let r = engine(r#"{"inp\u0075t":"a","model":"m"}"#);
        assert_eq!(r.inputs, vec![Input::Text("a".into())]);
        let r = engine(r#"{"input":"a","model":"first","model":"last"}"#);
        assert_eq!(r.model.as_deref(), Some("last"));
    }

    #[test]
    fn invalid_requests_are_refused_with_the_offending_param() {
        assert_eq!(rejected(r#"{"model":"m"}"#).1.as_deref(), Some("input"));
        assert_eq!(rejected(r#"{"input":"a"}"#).1.as_deref(), Some("model"));
        for bad in [
            r#"{"input":"","model":"m"}"#,
            r#"{"input":[],"model":"m"}"#,
            r#"{"input":["a",1],"model":"m"}"#,
            r#"{"input":[1,"a"],"model":"m"}"#,
            r#"{"input":[-1],"model":"m"}"#,
            r#"{"input":[4294967296],"model":"m"}"#,
            r#"{"input":[[]],"model":"m"}"#,
            r#"{"input":[1.5],"model":"m"}"#,
            r#"{"input":{"a":1},"model":"m"}"#,
            r#"{"input":true,"model":"m"}"#,
        ] {
            assert_eq!(rejected(bad).1.as_deref(), Some("input"), "{bad}");
        }
        assert_eq!(
            rejected(r#"{"input":"a","model":"m","encoding_format":"int8"}"#)
                .1
                .as_deref(),
            Some("encoding_format")
        );
        assert_eq!(
            rejected(r#"{"input":"a","model":"m","dimensions":0}"#)
                .1
                .as_deref(),
            Some("dimensions")
        );
        assert!(rejected("not json").1.is_none());
        assert!(rejected("[1,2]").1.is_none());
    }

    #[test]
    fn azure_requests_need_no_model() {
        assert!(matches!(
            parse(br#"{"input":"a"}"#, false),
            Ok(Parsed::Engine(_))
        ));
    }
}
