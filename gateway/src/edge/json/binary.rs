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
use crate::proto::Tensor;

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

/// Bytes per value in binary form; `None` for BYTES (length-prefixed) and
/// unknown datatypes.
fn width(datatype: &str) -> Option<usize> {
    match datatype {
        "FP16" => Some(2),
        other => crate::tensor::raw_width(other),
    }
}

/// Decode an input from `bytes`, its binary data (exactly
/// `binary_data_size` bytes): `t` carries its name, datatype and shape,
/// which holds `count` values. Errors name the input and say what the shape
/// needs against what was sent.
pub fn tensor_from_binary(mut t: Tensor, count: u64, bytes: &[u8], field: &str) -> Result<Tensor, GatewayError> {
    let size_field = || format!("{field}.parameters.{DATA_SIZE}");
    if t.datatype == "BYTES" {
        t.bytes_contents = elements(bytes, count).map_err(|why| {
            let needs = format!("input {:?}: shape {:?} needs {count} BYTES elements", t.name, t.shape);
            GatewayError::invalid(size_field(), format!("{needs}; {why}"))
        })?;
        return Ok(t);
    }
    let Some(width) = width(&t.datatype) else {
        return Err(GatewayError::invalid(format!("{field}.datatype"), format!("unknown datatype {:?}", t.datatype)));
    };
    let needed = count.saturating_mul(width as u64);
    if needed != bytes.len() as u64 {
        let (name, shape, datatype, got) = (&t.name, &t.shape, &t.datatype, bytes.len());
        return Err(GatewayError::invalid(
            size_field(),
            format!("input {name:?}: shape {shape:?} of {datatype} needs {needed} bytes, binary_data_size is {got}"),
        ));
    }
    if t.datatype == "FP16" {
        t.fp32_contents = bytes.as_chunks::<2>().0.iter().map(|b| half::f16::from_le_bytes(*b).to_f32()).collect();
    } else {
        t.raw_contents = bytes.to_vec();
        crate::tensor::from_raw(&mut t).map_err(|e| GatewayError::invalid(size_field(), e))?;
    }
    Ok(t)
}

/// `count` length-prefixed elements filling `bytes` exactly.
fn elements(mut bytes: &[u8], count: u64) -> Result<Vec<Vec<u8>>, String> {
    // Each element takes at least its 4-byte length.
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(bytes.len() / 4));
    while let Some((length, rest)) = bytes.split_first_chunk::<4>() {
        let length = u32::from_le_bytes(*length) as usize;
        if length > rest.len() {
            return Err(format!("element {} says {length} bytes, {} are left", out.len(), rest.len()));
        }
        let (element, rest) = rest.split_at(length);
        out.push(element.to_vec());
        bytes = rest;
        if out.len() as u64 > count {
            return Err("the data holds more".to_owned());
        }
    }
    if !bytes.is_empty() {
        return Err(format!("{} bytes left over, too few for an element's length", bytes.len()));
    }
    if out.len() as u64 != count {
        return Err(format!("the data holds {}", out.len()));
    }
    Ok(out)
}

/// Output `t` in binary form; `None` when its values do not fit its
/// datatype (the caller says so).
pub fn tensor_to_binary(mut t: Tensor) -> Option<Vec<u8>> {
    match t.datatype.as_str() {
        "BYTES" => {
            let size = t.bytes_contents.iter().map(|b| 4 + b.len()).sum();
            let mut out = Vec::with_capacity(size);
            for b in &t.bytes_contents {
                out.extend_from_slice(&u32::try_from(b.len()).ok()?.to_le_bytes());
                out.extend_from_slice(b);
            }
            Some(out)
        }
        "FP16" => Some(t.fp32_contents.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        _ => {
            crate::tensor::into_raw(&mut t);
            let empty = t.bool_contents.is_empty()
                && t.int64_contents.is_empty()
                && t.uint64_contents.is_empty()
                && t.fp32_contents.is_empty()
                && t.fp64_contents.is_empty();
            (empty && crate::tensor::raw_width(&t.datatype).is_some()).then_some(t.raw_contents)
        }
    }
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

    fn input(shape: &[i64], datatype: &str) -> Tensor {
        Tensor { name: "x".into(), datatype: datatype.into(), shape: shape.to_vec(), ..Default::default() }
    }

    fn decode(t: Tensor, bytes: &[u8]) -> Result<Tensor, GatewayError> {
        let count = t.shape.iter().product::<i64>().unsigned_abs();
        tensor_from_binary(t, count, bytes, "inputs[0]")
    }

    #[test]
    fn every_datatype_decodes_from_its_binary_form_and_encodes_back() {
        let cases: [(&str, Vec<u8>); 5] = [
            ("FP32", [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect()),
            ("INT64", [i64::MIN, 7].iter().flat_map(|v| v.to_le_bytes()).collect()),
            ("UINT8", vec![0, 255]),
            ("BOOL", vec![1, 0]),
            (
                "FP16",
                [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ];
        for (datatype, bytes) in cases {
            let t = decode(input(&[2], datatype), &bytes).unwrap();
            assert!(t.raw_contents.is_empty(), "{datatype}: typed inside the gateway");
            assert_eq!(tensor_to_binary(t).unwrap(), bytes, "{datatype}");
        }
        let t = decode(input(&[2], "FP16"), &[0, 0x38, 0, 0xc2]).unwrap();
        assert_eq!(t.fp32_contents, vec![0.5, -3.0]);
        let mut words = Vec::new();
        for w in [&b"caf\xc3\xa9"[..], b"", b"\x00\xff"] {
            words.extend_from_slice(&u32::try_from(w.len()).unwrap().to_le_bytes());
            words.extend_from_slice(w);
        }
        let t = decode(input(&[3], "BYTES"), &words).unwrap();
        assert_eq!(t.bytes_contents, vec![b"caf\xc3\xa9".to_vec(), Vec::new(), b"\x00\xff".to_vec()]);
        assert_eq!(tensor_to_binary(t).unwrap(), words);
    }

    #[test]
    fn sizes_that_disagree_with_the_shape_are_refused_with_the_input_named() {
        let detail = |e: GatewayError| e.problem(None).detail;
        let e = decode(input(&[2, 2], "INT32"), &[0; 12]).unwrap_err();
        assert!(detail(e).contains("input \"x\": shape [2, 2] of INT32 needs 16 bytes, binary_data_size is 12"));
        let e = decode(input(&[2], "BYTES"), &[1, 0, 0, 0, b'a']).unwrap_err();
        assert!(detail(e).contains("needs 2 BYTES elements; the data holds 1"), "{}", "");
        let e = decode(input(&[1], "BYTES"), &[1, 0, 0, 0, b'a', 0, 0]).unwrap_err();
        assert!(detail(e).contains("2 bytes left over"));
        // A declared shape far beyond the data reserves nothing for it.
        let e = decode(input(&[268_435_456], "BYTES"), &[0, 0, 0, 0]).unwrap_err();
        assert!(detail(e).contains("the data holds 1"));
        let e = decode(input(&[1], "FP8"), &[0]).unwrap_err();
        assert_eq!(e.problem(None).field.as_deref(), Some("inputs[0].datatype"));
    }
}
