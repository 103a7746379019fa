//! JSON <-> proto transcoding for the REST edge: Open Inference Protocol v2
//! tensors here, the OpenAI embeddings shapes in `embeddings`. Pure
//! functions, no I/O: this is the hot path the criterion bench measures.
//!
//! Tensor data never becomes a JSON tree: a request's `data` is kept as the
//! raw text it was sent as and parsed, once its datatype is known, straight
//! into the proto's typed vector (never more reserved than the text could
//! hold, whatever the shape says); an answer's data is written straight
//! from the typed vectors.

use std::collections::HashMap;

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

mod binary;
mod embeddings;

pub use binary::{ALL_OUTPUTS, BinaryOutputs, DATA_SIZE, HEADER_LENGTH, split as split_binary};

pub use embeddings::{
    EmbeddingData, EmbeddingValue, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage, EncodingFormat,
    MAX_EMBED_INPUTS, embeddings_response,
};

use crate::error::GatewayError;
use crate::proto::{InferItem, InferOutputs, ModelInfo, ParamValue, Tensor, param_value};

/// `POST /v2/models/{model}/infer` body, borrowing each tensor's data from
/// the request's bytes.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequestJson<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    pub inputs: Vec<TensorJson<'a>>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// One input tensor in OIP JSON form.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TensorJson<'a> {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    /// Values, flat or nested row-major; parsed by [`tensor_from_json`].
    /// Absent when `parameters.binary_data_size` says the values follow the
    /// JSON in binary form.
    #[serde(borrow, default)]
    #[schema(value_type = Option<Value>)]
    pub data: Option<&'a RawValue>,
}

/// An output the client asks for.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
}

/// `POST /v2/models/{model}/infer` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferResponseJson {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    pub outputs: Vec<TensorOut>,
}

/// One output tensor in OIP JSON form (data flattened, row-major), or
/// with `parameters.binary_data_size` when its values follow in binary.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TensorOut {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Value>>)]
    pub data: Option<OutData>,
}

/// An output tensor's values, written to JSON as they are held.
#[derive(Debug)]
pub enum OutData {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Uint(Vec<u64>),
    Float(Vec<f32>),
    Double(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

impl Serialize for OutData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Bool(v) => s.collect_seq(v),
            Self::Int(v) => s.collect_seq(v),
            Self::Uint(v) => s.collect_seq(v),
            // The shortest text that reads back as the same f32 (`0.1`, not
            // the `0.10000000149011612` of its f64 widening).
            Self::Float(v) => s.collect_seq(v),
            Self::Double(v) => s.collect_seq(v),
            Self::Bytes(v) => s.collect_seq(v.iter().map(|b| String::from_utf8_lossy(b))),
        }
    }
}

/// The element kind a datatype is carried as.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Elem {
    Bool,
    Int { min: i64, max: i64 },
    Uint { max: u64 },
    Float,
    Double,
    Bytes,
}

fn elem(datatype: &str) -> Option<Elem> {
    Some(match datatype {
        "BOOL" => Elem::Bool,
        "INT8" => Elem::Int { min: i8::MIN.into(), max: i8::MAX.into() },
        "INT16" => Elem::Int { min: i16::MIN.into(), max: i16::MAX.into() },
        "INT32" => Elem::Int { min: i32::MIN.into(), max: i32::MAX.into() },
        "INT64" => Elem::Int { min: i64::MIN, max: i64::MAX },
        "UINT8" => Elem::Uint { max: u8::MAX.into() },
        "UINT16" => Elem::Uint { max: u16::MAX.into() },
        "UINT32" => Elem::Uint { max: u32::MAX.into() },
        "UINT64" => Elem::Uint { max: u64::MAX },
        "FP16" | "FP32" => Elem::Float,
        "FP64" => Elem::Double,
        "BYTES" => Elem::Bytes,
        _ => return None,
    })
}

/// The number of values a tensor `shape` holds: every dimension >= 0, at
/// most 2^28 in all. Errors name `<field>.shape`.
pub fn element_count(shape: &[i64], field: &str) -> Result<u64, GatewayError> {
    if let Some(i) = shape.iter().position(|d| *d < 0) {
        return Err(GatewayError::invalid(format!("{field}.shape[{i}]"), "dimensions must be >= 0"));
    }
    shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d as u64))
        .filter(|n| *n <= 1 << 28)
        .ok_or_else(|| GatewayError::invalid(format!("{field}.shape"), "shape has too many elements"))
}

/// One JSON scalar as the parser met it (non-negative integers come as `U64`).
#[derive(Clone, Copy)]
enum Scalar<'s> {
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(&'s str),
}

/// Why reading a tensor's values stopped.
const TOO_MANY: &str = "more values than the shape holds";
const WRONG_TYPE: &str = "a value of the wrong type";

/// Reads a scalar or a (nested) array of them into `out`, row-major,
/// converting each with `accept`, and stopping at `max` values.
struct Flat<'o, T> {
    out: &'o mut Vec<T>,
    max: usize,
    accept: &'o dyn Fn(Scalar<'_>) -> Option<T>,
}

impl<T> Flat<'_, T> {
    fn push<E: serde::de::Error>(self, s: Scalar<'_>) -> Result<(), E> {
        if self.out.len() >= self.max {
            return Err(E::custom(TOO_MANY));
        }
        let value = (self.accept)(s).ok_or_else(|| E::custom(WRONG_TYPE))?;
        self.out.push(value);
        Ok(())
    }
}

impl<'de, T> DeserializeSeed<'de> for Flat<'_, T> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T> Visitor<'de> for Flat<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(WRONG_TYPE)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Self { out, max, accept } = self;
        while seq.next_element_seed(Flat { out: &mut *out, max, accept })?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Scalar::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Scalar::I64(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Scalar::U64(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Scalar::F64(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Scalar::Str(v))
    }
}

/// Parse `raw` into exactly `expected` values of `datatype`; errors name
/// `<field>.data` (count) or `<field>.data[i]` (the value at fault).
fn read_values<T>(
    raw: &RawValue,
    expected: u64,
    shape: &[i64],
    datatype: &str,
    field: &str,
    what: &str,
    accept: &dyn Fn(Scalar<'_>) -> Option<T>,
) -> Result<Vec<T>, GatewayError> {
    let expected = usize::try_from(expected).unwrap_or(usize::MAX);
    // Each value takes at least two bytes of text (`1,`): the shape cannot
    // make the gateway reserve more than the body could fill.
    let mut out = Vec::with_capacity(expected.min(raw.get().len() / 2 + 1));
    let count_error = |got: &str| {
        GatewayError::invalid(format!("{field}.data"), format!("shape {shape:?} needs {expected} values, got {got}"))
    };
    let mut de = serde_json::Deserializer::from_str(raw.get());
    if let Err(e) = (Flat { out: &mut out, max: expected, accept }).deserialize(&mut de) {
        return Err(if e.to_string().starts_with(TOO_MANY) {
            count_error("more")
        } else {
            GatewayError::invalid(format!("{field}.data[{}]", out.len()), format!("expected {what} for {datatype}"))
        });
    }
    if out.len() != expected {
        return Err(count_error(&out.len().to_string()));
    }
    Ok(out)
}

/// Decode one OIP JSON tensor; errors name the field, e.g. `inputs[0].data[3]`.
pub fn tensor_from_json(t: &TensorJson<'_>, field: &str) -> Result<Tensor, GatewayError> {
    let kind = elem(&t.datatype).ok_or_else(|| {
        GatewayError::invalid(format!("{field}.datatype"), format!("unknown datatype {:?}", t.datatype))
    })?;
    let expected = element_count(&t.shape, field)?;
    let mut out =
        Tensor { name: t.name.clone(), datatype: t.datatype.clone(), shape: t.shape.clone(), ..Default::default() };
    let data = t.data.ok_or_else(|| {
        GatewayError::invalid(
            format!("{field}.data"),
            format!("is required (or parameters.{DATA_SIZE} with binary data)"),
        )
    })?;
    macro_rules! read {
        ($what:expr, $accept:expr) => {
            read_values(data, expected, &t.shape, &t.datatype, field, $what, $accept)
        };
    }
    match kind {
        Elem::Bool => {
            out.bool_contents = read!("a boolean", &|s| match s {
                Scalar::Bool(b) => Some(b),
                _ => None,
            })?;
        }
        Elem::Int { min, max } => {
            out.int64_contents = read!("an integer in range", &|s| {
                match s {
                    Scalar::I64(n) => Some(n),
                    Scalar::U64(n) => i64::try_from(n).ok(),
                    _ => None,
                }
                .filter(|n| (min..=max).contains(n))
            })?;
        }
        Elem::Uint { max } => {
            out.uint64_contents = read!("an unsigned integer in range", &|s| {
                match s {
                    Scalar::U64(n) => Some(n),
                    Scalar::I64(n) => u64::try_from(n).ok(),
                    _ => None,
                }
                .filter(|n| *n <= max)
            })?;
        }
        Elem::Float => {
            out.fp32_contents = read!("a number", &|s| match s {
                Scalar::F64(f) => Some(f as f32),
                Scalar::I64(n) => Some(n as f32),
                Scalar::U64(n) => Some(n as f32),
                _ => None,
            })?;
        }
        Elem::Double => {
            out.fp64_contents = read!("a number", &|s| match s {
                Scalar::F64(f) => Some(f),
                Scalar::I64(n) => Some(n as f64),
                Scalar::U64(n) => Some(n as f64),
                _ => None,
            })?;
        }
        Elem::Bytes => {
            out.bytes_contents = read!("a string", &|s| match s {
                Scalar::Str(s) => Some(s.as_bytes().to_vec()),
                _ => None,
            })?;
        }
    }
    Ok(out)
}

/// Decode request parameters; only scalars are allowed.
pub fn params_from_json(
    params: Option<&Map<String, Value>>,
    field: &str,
) -> Result<HashMap<String, ParamValue>, GatewayError> {
    let Some(params) = params else {
        return Ok(HashMap::new());
    };
    params
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::Bool(b) => param_value::Value::BoolParam(*b),
                Value::Number(n) if n.is_i64() => param_value::Value::Int64Param(n.as_i64().unwrap_or_default()),
                Value::Number(n) => param_value::Value::DoubleParam(n.as_f64().unwrap_or_default()),
                Value::String(s) => param_value::Value::StringParam(s.clone()),
                _ => {
                    return Err(GatewayError::invalid(
                        format!("{field}.{k}"),
                        "parameters must be booleans, numbers or strings",
                    ));
                }
            };
            Ok((k.clone(), ParamValue { value: Some(value) }))
        })
        .collect()
}

/// Encode parameters back to JSON.
pub fn params_to_json(params: &HashMap<String, ParamValue>) -> Map<String, Value> {
    params
        .iter()
        .map(|(k, v)| {
            let value = match &v.value {
                Some(param_value::Value::BoolParam(b)) => Value::from(*b),
                Some(param_value::Value::Int64Param(n)) => Value::from(*n),
                Some(param_value::Value::DoubleParam(f)) => Value::from(*f),
                Some(param_value::Value::StringParam(s)) => Value::from(s.clone()),
                None => Value::Null,
            };
            (k.clone(), value)
        })
        .collect()
}

/// Transcode an OIP JSON request into the worker's item.
pub fn infer_item_from_json(req: &InferRequestJson<'_>) -> Result<InferItem, GatewayError> {
    infer_item_from_parts(req, &[])
}

/// Transcode an OIP request whose inputs may have their values in `binary`
/// (the body after its JSON header), in order, as each input's
/// `parameters.binary_data_size` says.
pub fn infer_item_from_parts(req: &InferRequestJson<'_>, mut binary: &[u8]) -> Result<InferItem, GatewayError> {
    if req.inputs.is_empty() {
        return Err(GatewayError::invalid("inputs", "at least one input tensor is required"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, t) in req.inputs.iter().enumerate() {
        if !seen.insert(t.name.as_str()) {
            return Err(GatewayError::invalid(format!("inputs[{i}].name"), format!("input {:?} given twice", t.name)));
        }
        let field = format!("inputs[{i}]");
        let tensor = match binary::data_size(t.parameters.as_ref(), &field)? {
            Some(size) => {
                if t.data.is_some() {
                    return Err(GatewayError::invalid(
                        format!("{field}.data"),
                        format!("input {:?} has both data and parameters.{DATA_SIZE}", t.name),
                    ));
                }
                if size > binary.len() {
                    return Err(GatewayError::invalid(
                        format!("{field}.parameters.{DATA_SIZE}"),
                        format!("input {:?} says {size} bytes; {} are left in the body", t.name, binary.len()),
                    ));
                }
                let (data, rest) = binary.split_at(size);
                binary = rest;
                let count = element_count(&t.shape, &field)?;
                let described = Tensor {
                    name: t.name.clone(),
                    datatype: t.datatype.clone(),
                    shape: t.shape.clone(),
                    ..Default::default()
                };
                super::oip_bytes::decode(described, count, data, &field, &format!("{field}.parameters.{DATA_SIZE}"))?
            }
            None => tensor_from_json(t, &field)?,
        };
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(GatewayError::invalid(
            "body",
            format!("{} bytes follow the inputs' binary data (each input's {DATA_SIZE} adds up to less)", binary.len()),
        ));
    }
    // The extension's own parameter is for the gateway, not the model.
    let mut parameters = params_from_json(req.parameters.as_ref(), "parameters")?;
    parameters.remove(ALL_OUTPUTS);
    Ok(InferItem {
        id: req.id.clone().unwrap_or_default(),
        inputs,
        outputs: req.outputs.iter().flatten().map(|o| o.name.clone()).collect(),
        parameters,
    })
}

/// Encode one output tensor as OIP JSON (its vector moves into the answer).
pub fn tensor_to_json(t: Tensor) -> TensorOut {
    let data = match elem(&t.datatype) {
        Some(Elem::Bool) => OutData::Bool(t.bool_contents),
        Some(Elem::Int { .. }) => OutData::Int(t.int64_contents),
        Some(Elem::Uint { .. }) => OutData::Uint(t.uint64_contents),
        Some(Elem::Float) => OutData::Float(t.fp32_contents),
        Some(Elem::Double) => OutData::Double(t.fp64_contents),
        Some(Elem::Bytes) => OutData::Bytes(t.bytes_contents),
        None => OutData::Bool(Vec::new()),
    };
    TensorOut { name: t.name, datatype: t.datatype, shape: t.shape, parameters: Map::new(), data: Some(data) }
}

/// Build the OIP JSON answer.
pub fn infer_response_json(info: &ModelInfo, id: String, out: InferOutputs) -> InferResponseJson {
    InferResponseJson {
        model_name: info.name.clone(),
        model_version: info.version.clone(),
        id,
        parameters: params_to_json(&out.parameters),
        outputs: out.tensors.into_iter().map(tensor_to_json).collect(),
    }
}

/// Build the OIP answer with the outputs `binary` names in binary form:
/// the JSON header, and each binary output's bytes in order.
pub fn infer_response_parts(
    info: &ModelInfo,
    id: String,
    out: InferOutputs,
    binary: &BinaryOutputs,
) -> Result<(InferResponseJson, Vec<Vec<u8>>), GatewayError> {
    let mut chunks = Vec::new();
    let mut outputs = Vec::with_capacity(out.tensors.len());
    for t in out.tensors {
        if !binary.wants(&t.name) {
            outputs.push(tensor_to_json(t));
            continue;
        }
        let (name, datatype, shape) = (t.name.clone(), t.datatype.clone(), t.shape.clone());
        let bytes = super::oip_bytes::encode(t).ok_or_else(|| GatewayError::WorkerFailed {
            worker: "-".into(),
            detail: format!("output {name:?} has values its datatype {datatype} cannot hold"),
        })?;
        let mut parameters = Map::new();
        parameters.insert(DATA_SIZE.into(), Value::from(bytes.len()));
        outputs.push(TensorOut { name, datatype, shape, parameters, data: None });
        chunks.push(bytes);
    }
    let answer = InferResponseJson {
        model_name: info.name.clone(),
        model_version: info.version.clone(),
        id,
        parameters: params_to_json(&out.parameters),
        outputs,
    };
    Ok((answer, chunks))
}

impl InferResponseJson {
    /// The answer as JSON bytes, written into a buffer sized for its values
    /// up front: growing by doubling would copy a large tensor's text
    /// several times and hold two copies at once. Pages a generous estimate
    /// reserves but does not write take no memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let values: usize = self.outputs.iter().filter_map(|t| t.data.as_ref()).map(OutData::len).sum();
        let mut buf = Vec::with_capacity(512 + values.saturating_mul(MAX_VALUE_TEXT));
        serde_json::to_writer(&mut buf, self)?;
        Ok(buf)
    }
}

/// The longest text one tensor value takes (an f64 with its comma).
const MAX_VALUE_TEXT: usize = 25;

impl OutData {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::Bool(v) => v.len(),
            Self::Int(v) => v.len(),
            Self::Uint(v) => v.len(),
            Self::Float(v) => v.len(),
            Self::Double(v) => v.len(),
            Self::Bytes(v) => v.iter().map(|b| b.len() / MAX_VALUE_TEXT + 1).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transcode a request given as a JSON value (its data borrowed from text).
    fn item(v: Value) -> Result<InferItem, GatewayError> {
        let text = v.to_string();
        infer_item_from_json(&serde_json::from_str::<InferRequestJson<'_>>(&text).unwrap())
    }

    #[test]
    fn nested_data_flattens_row_major() {
        let item = item(
            serde_json::json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]}),
        )
        .unwrap();
        assert_eq!(item.inputs[0].int64_contents, vec![1, 2, 3, 4]);
    }

    #[test]
    fn element_count_must_match_shape() {
        let field = |v: Value| item(v).unwrap_err().problem(None).field;
        let short =
            serde_json::json!({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0]}]});
        assert_eq!(field(short).as_deref(), Some("inputs[0].data"));
        let long = serde_json::json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0, 2.0]}]});
        assert_eq!(field(long).as_deref(), Some("inputs[0].data"));
    }

    #[test]
    fn values_must_fit_the_datatype() {
        let field = |v: Value| item(v).unwrap_err().problem(None).field;
        let t = |datatype: &str, data: Value| serde_json::json!({"inputs": [{"name": "x", "shape": [2], "datatype": datatype, "data": data}]});
        assert_eq!(field(t("UINT8", serde_json::json!([1, 300]))).as_deref(), Some("inputs[0].data[1]"));
        assert_eq!(field(t("BYTES", serde_json::json!(["a", 5]))).as_deref(), Some("inputs[0].data[1]"));
        assert_eq!(field(t("INT8", serde_json::json!([[1], {"x": 1}]))).as_deref(), Some("inputs[0].data[1]"));
        assert_eq!(field(t("INT64", serde_json::json!([1, 1.5]))).as_deref(), Some("inputs[0].data[1]"));
        assert_eq!(field(t("BOOL", serde_json::json!([true, null]))).as_deref(), Some("inputs[0].data[1]"));
        assert_eq!(field(t("FP8", serde_json::json!([5, 6]))).as_deref(), Some("inputs[0].datatype"));
        // Integers are numbers too, at full precision where the type has it.
        let ok = item(t("FP64", serde_json::json!([1, -2]))).unwrap();
        assert_eq!(ok.inputs[0].fp64_contents, vec![1.0, -2.0]);
        let ok = item(t("UINT64", serde_json::json!([u64::MAX, 0]))).unwrap();
        assert_eq!(ok.inputs[0].uint64_contents, vec![u64::MAX, 0]);
        let ok = item(t("INT64", serde_json::json!([i64::MIN, i64::MAX]))).unwrap();
        assert_eq!(ok.inputs[0].int64_contents, vec![i64::MIN, i64::MAX]);
    }

    #[test]
    fn huge_shapes_are_rejected_before_allocating() {
        let field = |v: Value| item(v).unwrap_err().problem(None).field;
        let huge = serde_json::json!({"inputs": [{"name": "x", "shape": [1_000_000, 1_000_000], "datatype": "FP32", "data": []}]});
        assert_eq!(field(huge).as_deref(), Some("inputs[0].shape"));
        // Within the element cap but far beyond the data: refused by count,
        // with nothing reserved for the declared size.
        let text = r#"{"inputs": [{"name": "x", "shape": [268435456], "datatype": "FP64", "data": [1]}]}"#;
        let req: InferRequestJson<'_> = serde_json::from_str(text).unwrap();
        let err = tensor_from_json(&req.inputs[0], "inputs[0]").unwrap_err();
        assert_eq!(err.problem(None).field.as_deref(), Some("inputs[0].data"));
    }

    #[test]
    fn tensors_round_trip() {
        let item = item(serde_json::json!({
            "id": "a", "parameters": {"delay_ms": 5, "fail": false},
            "inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["hi", "there"]},
                       {"name": "f", "shape": [1, 2], "datatype": "FP64", "data": [[0.5, 1.5]]}]}))
        .unwrap();
        assert_eq!(item.parameters.len(), 2);
        let out = InferOutputs { tensors: item.inputs, parameters: HashMap::new() };
        let info = ModelInfo { name: "echo".into(), version: "1".into(), ..Default::default() };
        let json = serde_json::to_value(infer_response_json(&info, item.id, out)).unwrap();
        assert_eq!(json["outputs"][0]["data"], serde_json::json!(["hi", "there"]));
        assert_eq!(json["outputs"][1]["data"], serde_json::json!([0.5, 1.5]));
        assert_eq!(json["outputs"][1]["shape"], serde_json::json!([1, 2]));
        assert_eq!(json["id"], "a");
    }
}
