//! The Open Inference Protocol's binary tensor extension (Triton's
//! `binary_data`), which `tritonclient` uses by default: a body is a JSON
//! header of `Inference-Header-Content-Length` bytes, then each input that
//! says `parameters.binary_data_size` has that many bytes of raw values, in
//! the order of `inputs`. Numbers are little endian in the datatype's own
//! width (BOOL one byte, FP16 two); a BYTES element is a 4-byte little-endian
//! length and then its bytes. An answer carries outputs the same way when
//! the request asks (`parameters.binary_data_output` for all, or
//! `outputs[i].parameters.binary_data`).
//!
//! Sizes are checked against shape × datatype before a value is copied, and
//! nothing is reserved beyond the bytes the body holds.

use serde_json::{Map, Value};

use crate::error::GatewayError;

/// Header giving the length of the JSON part of a body or an answer.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Request parameter asking for every output in binary.
pub const ALL_OUTPUTS: &str = "binary_data_output";

/// Tensor parameter giving the size of its binary data.
pub const DATA_SIZE: &str = "binary_data_size";

/// Output parameter asking for it in binary.
const ONE_OUTPUT: &str = "binary_data";

/// Which outputs a request wants in binary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BinaryOutputs {
    #[default]
    None,
    All,
    Named(Vec<String>),
}

impl BinaryOutputs {
    /// What a request asks for: each named output as its `binary_data`
    /// says, defaulting to the request's `binary_data_output`; with no
    /// outputs named, every output as `binary_data_output` says.
    /// `parameters` are the request's, `outputs` its named outputs with
    /// their parameters.
    pub fn of<'r>(
        parameters: Option<&Map<String, Value>>,
        outputs: impl IntoIterator<Item = (&'r str, Option<&'r Map<String, Value>>)>,
    ) -> Self {
        let flag = |p: Option<&Map<String, Value>>, key| p.and_then(|p| p.get(key)).and_then(Value::as_bool);
        let all = flag(parameters, ALL_OUTPUTS).unwrap_or(false);
        let mut named = false;
        let binary: Vec<String> = outputs
            .into_iter()
            .inspect(|_| named = true)
            .filter(|(_, p)| flag(*p, ONE_OUTPUT).unwrap_or(all))
            .map(|(name, _)| name.to_owned())
            .collect();
        match (named, all) {
            (false, true) => Self::All,
            (false, false) => Self::None,
            (true, _) if binary.is_empty() => Self::None,
            (true, _) => Self::Named(binary),
        }
    }

    /// Whether output `name` goes binary.
    pub fn wants(&self, name: &str) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Named(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Split a body into its JSON header and its binary part, at the length the
/// `Inference-Header-Content-Length` header gives.
pub fn split<'b>(body: &'b [u8], header_length: &http::HeaderValue) -> Result<(&'b [u8], &'b [u8]), GatewayError> {
    let length = header_length.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or_else(|| {
        GatewayError::invalid("Inference-Header-Content-Length", "must be the JSON header's length in bytes")
    })?;
    if length > body.len() {
        return Err(GatewayError::invalid(
            "Inference-Header-Content-Length",
            format!("says the JSON header is {length} bytes; the body has {}", body.len()),
        ));
    }
    Ok(body.split_at(length))
}

/// The size an input's `parameters.binary_data_size` gives, if it has one.
pub fn data_size(parameters: Option<&Map<String, Value>>, field: &str) -> Result<Option<usize>, GatewayError> {
    let Some(size) = parameters.and_then(|p| p.get(DATA_SIZE)) else { return Ok(None) };
    size.as_u64().and_then(|s| usize::try_from(s).ok()).map(Some).ok_or_else(|| {
        GatewayError::invalid(format!("{field}.parameters.{DATA_SIZE}"), "must be a whole number of bytes")
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn outputs_go_binary_as_the_request_and_each_output_say() {
        let of = |v: Value| {
            let outputs = v.get("outputs").and_then(Value::as_array).cloned().unwrap_or_default();
            let named: Vec<(&str, Option<&Map<String, Value>>)> = outputs
                .iter()
                .map(|o| (o["name"].as_str().unwrap(), o.get("parameters").and_then(Value::as_object)))
                .collect();
            BinaryOutputs::of(v.get("parameters").and_then(Value::as_object), named)
        };
        let inputs = json!([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]);
        assert_eq!(of(json!({"inputs": inputs})), BinaryOutputs::None);
        assert_eq!(of(json!({"inputs": inputs, "parameters": {"binary_data_output": true}})), BinaryOutputs::All);
        let named = json!([{"name": "a", "parameters": {"binary_data": true}}, {"name": "b"},
                           {"name": "c", "parameters": {"binary_data": false}}]);
        assert_eq!(of(json!({"inputs": inputs, "outputs": named})), BinaryOutputs::Named(vec!["a".into()]));
        let all = json!({"inputs": inputs, "outputs": named, "parameters": {"binary_data_output": true}});
        assert_eq!(of(all), BinaryOutputs::Named(vec!["a".into(), "b".into()]));
    }
}
