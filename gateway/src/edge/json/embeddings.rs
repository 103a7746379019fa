//! The OpenAI embeddings shapes: `POST /v1/embeddings` in, vectors out as
//! floats or base64 little-endian f32.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::GatewayError;

/// Most inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// `POST /v1/embeddings` body (OpenAI shape).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct EmbeddingsRequest {
    pub model: String,
    #[schema(schema_with = input_schema)]
    pub input: Value,
    #[serde(default)]
    #[schema(value_type = Option<EncodingFormatName>)]
    pub encoding_format: Option<String>,
    /// Must be the model's own (no truncation).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
}

/// The schema of `input`: a text, or up to [`MAX_EMBED_INPUTS`] of them
/// (token arrays are not supported).
fn input_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String);
    let many = ArrayBuilder::new().items(text()).min_items(Some(1)).max_items(Some(MAX_EMBED_INPUTS));
    OneOfBuilder::new().item(text()).item(many).into()
}

/// How vectors are written: `float` (default) or `base64` (little-endian f32).
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code, reason = "a schema only")]
enum EncodingFormatName {
    Float,
    Base64,
}

/// How vectors are written in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    Float,
    /// Little-endian f32 bytes, base64: what the OpenAI SDKs ask for by default.
    Base64,
}

impl EmbeddingsRequest {
    /// The texts to embed, checked: a string or a non-empty array of strings.
    pub fn texts(&self) -> Result<Vec<String>, GatewayError> {
        let texts = match &self.input {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) if items.is_empty() => {
                return Err(GatewayError::invalid("input", "must not be empty"));
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        GatewayError::invalid(
                            format!("input[{i}]"),
                            "must be a string (token arrays are not supported)",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(GatewayError::invalid("input", "must be a string or an array of strings"));
            }
        };
        if texts.len() > MAX_EMBED_INPUTS {
            return Err(GatewayError::invalid("input", format!("at most {MAX_EMBED_INPUTS} inputs per request")));
        }
        Ok(texts)
    }

    /// The requested encoding, checked.
    pub fn format(&self) -> Result<EncodingFormat, GatewayError> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(EncodingFormat::Float),
            Some("base64") => Ok(EncodingFormat::Base64),
            Some(other) => Err(GatewayError::invalid(
                "encoding_format",
                format!("expected \"float\" or \"base64\", got {other:?}"),
            )),
        }
    }
}

/// `POST /v1/embeddings` answer (OpenAI shape).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingsResponse {
    pub object: &'static str,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: EmbeddingsUsage,
}

/// One vector of the answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingData {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingValue,
}

/// A vector as JSON numbers (shortest f32 form) or base64 of little-endian f32.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

/// Token counts of an embeddings call.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingsUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

/// Build the OpenAI embeddings answer.
pub fn embeddings_response(
    model: &str,
    vectors: Vec<Vec<f32>>,
    prompt_tokens: u32,
    format: EncodingFormat,
) -> EmbeddingsResponse {
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = match format {
                EncodingFormat::Float => EmbeddingValue::Float(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    EmbeddingValue::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            EmbeddingData { object: "embedding", index, embedding }
        })
        .collect();
    EmbeddingsResponse {
        object: "list",
        data,
        model: model.to_owned(),
        usage: EmbeddingsUsage { prompt_tokens, total_tokens: prompt_tokens },
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn embeddings_input_forms() {
        let parse = |v: Value| serde_json::from_value::<EmbeddingsRequest>(v).unwrap();
        assert_eq!(parse(serde_json::json!({"model": "m", "input": "a"})).texts().unwrap(), vec!["a"]);
        assert_eq!(parse(serde_json::json!({"model": "m", "input": ["a", "b"]})).texts().unwrap().len(), 2);
        let field = |v: Value| parse(v).texts().unwrap_err().problem(None).field;
        assert_eq!(field(serde_json::json!({"model": "m", "input": []})).as_deref(), Some("input"));
        assert_eq!(field(serde_json::json!({"model": "m", "input": ["a", 7]})).as_deref(), Some("input[1]"));
        assert_eq!(field(serde_json::json!({"model": "m", "input": 7})).as_deref(), Some("input"));
        assert!(parse(serde_json::json!({"model": "m", "input": "a", "encoding_format": "hex"})).format().is_err());
    }

    #[test]
    fn float_embeddings_keep_f32_precision_in_shortest_form() {
        let v = embeddings_response("m", vec![vec![0.1, 1.0e-7]], 2, EncodingFormat::Float);
        let text = serde_json::to_string(&v).unwrap();
        assert!(text.contains("[0.1,1e-7]"), "{text}");
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["data"][0]["index"], 0);
        assert_eq!(back["object"], "list");
    }

    #[test]
    fn base64_embeddings_are_little_endian_f32() {
        let v =
            serde_json::to_value(embeddings_response("m", vec![vec![1.0, -2.0]], 3, EncodingFormat::Base64)).unwrap();
        let b64 = v["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let floats: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(floats, vec![1.0, -2.0]);
        assert_eq!(v["usage"]["total_tokens"], 3);
    }
}
