//! Open Inference Protocol v2 over gRPC, `inference.GRPCInferenceService`:
//! what `tritonclient.grpc` and KServe v2 clients call. Like the REST OIP
//! routes, it only decodes and encodes: admission, routing (aliases,
//! versions, pins), batching, caching and metering are the request core's.
//!
//! Tensors come typed (`contents`) or raw (`raw_input_contents`, one entry
//! per input in order: the form tritonclient sends); the answer mirrors the
//! request: raw outputs (`raw_output_contents`) for a raw request, typed for
//! a typed one, and raw whenever an output is FP16 (which has no typed
//! field). Input and output `parameters` that ask for shared memory are
//! refused: the gateway does not read clients' memory.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::super::EdgeState;
use super::call::{ask, fail, request_id, respond};
use crate::error::GatewayError;
use crate::proto::oip::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::oip::infer_parameter::ParameterChoice;
use crate::proto::oip::model_infer_request::InferInputTensor;
use crate::proto::oip::model_infer_response::InferOutputTensor;
use crate::proto::oip::model_metadata_response::TensorMetadata;
use crate::proto::oip::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use crate::proto::{InferItem, InferOutputs, ModelEntry, ModelInfo, ParamValue, Tensor, param_value};
use crate::service::Answer;

/// The OIP v2 gRPC service over the request core.
pub struct OipService {
    pub(super) state: Arc<EdgeState>,
}

/// A parameter that would make the server read or write the client's
/// shared memory (Triton's extension).
const SHARED_MEMORY: &str = "shared_memory_region";

/// Tensors larger than this are converted on a bulk thread.
const OFFLOAD_BYTES: usize = 1 << 20;

#[tonic::async_trait]
impl GrpcInferenceService for OipService {
    async fn server_live(&self, _req: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _req: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: super::super::meta::server_ready(&self.state) }))
    }

    async fn model_ready(&self, req: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let rid = request_id(&req);
        let r = req.into_inner();
        let entry = self.entry(&r.name, &r.version).map_err(|e| fail(e, &rid))?;
        Ok(Response::new(ModelReadyResponse { ready: entry.ready }))
    }

    async fn server_metadata(
        &self,
        _req: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let meta = super::super::meta::server();
        Ok(Response::new(ServerMetadataResponse {
            name: meta.name,
            version: meta.version,
            extensions: meta.extensions,
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let rid = request_id(&req);
        let r = req.into_inner();
        let meta = super::super::meta::metadata_of(self.entry(&r.name, &r.version).map_err(|e| fail(e, &rid))?);
        let spec = |s: super::super::meta::TensorMetadata| TensorMetadata {
            name: s.name,
            datatype: s.datatype,
            shape: s.shape,
        };
        Ok(Response::new(ModelMetadataResponse {
            name: meta.name,
            versions: meta.versions,
            platform: meta.platform,
            inputs: meta.inputs.into_iter().map(spec).collect(),
            outputs: meta.outputs.into_iter().map(spec).collect(),
            properties: HashMap::new(),
        }))
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let mut ask = ask(&self.state, &req)?;
        let rid = ask.request_id.clone();
        let r = req.into_inner();
        let result = async {
            let core = &self.state.core;
            if !r.model_version.is_empty() {
                ask.pin = core.version_entry(&r.model_name, &r.model_version)?.1;
            }
            ask.model.clone_from(&r.model_name);
            // The model is in the message: refuse over-limit callers before
            // its tensors are converted.
            let admitted = core.admit_infer(ask).await?;
            let raw = !r.raw_input_contents.is_empty();
            let large = r.raw_input_contents.iter().map(Vec::len).sum::<usize>() > OFFLOAD_BYTES;
            let item = offload(large, move || item(r)).await?;
            let id = item.id.clone();
            let Answer { value: (info, out), served } = core.infer(admitted, item).await?;
            let large = out.tensors.iter().map(crate::tensor::size).sum::<usize>() > OFFLOAD_BYTES / 4;
            let msg = offload(large, move || answer(&info, id, out, raw)).await?;
            Ok((msg, served))
        }
        .await;
        result.map(|(msg, served)| respond(msg, &rid, &served)).map_err(|e| fail(e, &rid))
    }
}

impl OipService {
    /// A model, or one version of it, by the names a request gives.
    fn entry(&self, model: &str, version: &str) -> Result<ModelEntry, GatewayError> {
        let core = &self.state.core;
        if version.is_empty() { core.entry(model) } else { core.version_entry(model, version).map(|(entry, _)| entry) }
    }
}

/// Run `work` on a bulk thread when `large` (a tensor's conversion takes
/// milliseconds), else here.
async fn offload<T: Send + 'static>(
    large: bool,
    work: impl FnOnce() -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, GatewayError> {
    if !large {
        return work();
    }
    crate::bulk::run(work).await.map_err(|e| GatewayError::WorkerFailed {
        worker: "-".into(),
        detail: format!("cannot convert tensors: {e}"),
    })?
}

/// The core's item for a request: its inputs typed and checked, its
/// requested outputs and parameters.
fn item(r: ModelInferRequest) -> Result<InferItem, GatewayError> {
    if r.inputs.is_empty() {
        return Err(GatewayError::invalid("inputs", "at least one input tensor is required"));
    }
    let raw = r.raw_input_contents;
    if !raw.is_empty() && raw.len() != r.inputs.len() {
        return Err(GatewayError::invalid(
            "raw_input_contents",
            format!("holds {} entries for {} inputs: one per input, in order", raw.len(), r.inputs.len()),
        ));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for (i, input) in r.inputs.into_iter().enumerate() {
        let field = format!("inputs[{i}]");
        no_shared_memory(&input.parameters, &field)?;
        inputs.push(match raw.next() {
            Some(bytes) => raw_input(input, &bytes, &field, i)?,
            None => typed_input(input, &field)?,
        });
    }
    let mut outputs = Vec::with_capacity(r.outputs.len());
    for (i, o) in r.outputs.into_iter().enumerate() {
        no_shared_memory(&o.parameters, &format!("outputs[{i}]"))?;
        outputs.push(o.name);
    }
    let parameters = r
        .parameters
        .into_iter()
        .map(|(k, v)| {
            let field = format!("parameters.{k}");
            param(v, &field).map(|v| (k, v))
        })
        .collect::<Result<_, _>>()?;
    Ok(InferItem { id: r.id, inputs, outputs, parameters })
}

fn no_shared_memory(parameters: &HashMap<String, InferParameter>, field: &str) -> Result<(), GatewayError> {
    match parameters.contains_key(SHARED_MEMORY) {
        true => Err(GatewayError::invalid(
            format!("{field}.parameters.{SHARED_MEMORY}"),
            "shared memory is not supported: send the tensor's bytes",
        )),
        false => Ok(()),
    }
}

fn described(input: &InferInputTensor) -> Tensor {
    Tensor {
        name: input.name.clone(),
        datatype: input.datatype.clone(),
        shape: input.shape.clone(),
        ..Default::default()
    }
}

/// An input from its entry of `raw_input_contents`.
fn raw_input(input: InferInputTensor, bytes: &[u8], field: &str, i: usize) -> Result<Tensor, GatewayError> {
    if input.contents.is_some() {
        return Err(GatewayError::invalid(
            format!("{field}.contents"),
            "must be empty when the request uses raw_input_contents",
        ));
    }
    let count = super::super::json::element_count(&input.shape, field)?;
    super::super::oip_bytes::decode(described(&input), count, bytes, field, &format!("raw_input_contents[{i}]"))
}

/// An input from its typed `contents`: the field OIP gives its datatype
/// (INT8..INT32 in `int_contents`, INT64 in `int64_contents`, ...), and no
/// other.
fn typed_input(input: InferInputTensor, field: &str) -> Result<Tensor, GatewayError> {
    let mut t = described(&input);
    let c = input.contents.unwrap_or_default();
    let wrong = |used: &str| {
        Err(GatewayError::invalid(
            format!("{field}.contents"),
            format!("{} values go in contents.{used} (or raw_input_contents), and only there", t.datatype),
        ))
    };
    let others_empty = |keep: &str| {
        [
            ("bool_contents", c.bool_contents.is_empty()),
            ("int_contents", c.int_contents.is_empty()),
            ("int64_contents", c.int64_contents.is_empty()),
            ("uint_contents", c.uint_contents.is_empty()),
            ("uint64_contents", c.uint64_contents.is_empty()),
            ("fp32_contents", c.fp32_contents.is_empty()),
            ("fp64_contents", c.fp64_contents.is_empty()),
            ("bytes_contents", c.bytes_contents.is_empty()),
        ]
        .iter()
        .all(|(name, empty)| *name == keep || *empty)
    };
    let used = match t.datatype.as_str() {
        "BOOL" => "bool_contents",
        "INT8" | "INT16" | "INT32" => "int_contents",
        "INT64" => "int64_contents",
        "UINT8" | "UINT16" | "UINT32" => "uint_contents",
        "UINT64" => "uint64_contents",
        "FP32" => "fp32_contents",
        "FP64" => "fp64_contents",
        "BYTES" => "bytes_contents",
        "FP16" => return wrong("(none: FP16 has no typed field; use raw_input_contents)"),
        other => {
            return Err(GatewayError::invalid(format!("{field}.datatype"), format!("unknown datatype {other:?}")));
        }
    };
    if !others_empty(used) {
        return wrong(used);
    }
    match used {
        "bool_contents" => t.bool_contents = c.bool_contents,
        "int_contents" => t.int64_contents = c.int_contents.into_iter().map(i64::from).collect(),
        "int64_contents" => t.int64_contents = c.int64_contents,
        "uint_contents" => t.uint64_contents = c.uint_contents.into_iter().map(u64::from).collect(),
        "uint64_contents" => t.uint64_contents = c.uint64_contents,
        "fp32_contents" => t.fp32_contents = c.fp32_contents,
        "fp64_contents" => t.fp64_contents = c.fp64_contents,
        _ => t.bytes_contents = c.bytes_contents,
    }
    super::super::convert::check_tensor(&mut t, field)?;
    Ok(t)
}

fn param(v: InferParameter, field: &str) -> Result<ParamValue, GatewayError> {
    use param_value::Value;
    let value = match v.parameter_choice {
        None => None,
        Some(ParameterChoice::BoolParam(b)) => Some(Value::BoolParam(b)),
        Some(ParameterChoice::Int64Param(i)) => Some(Value::Int64Param(i)),
        Some(ParameterChoice::StringParam(s)) => Some(Value::StringParam(s)),
        Some(ParameterChoice::DoubleParam(d)) => Some(Value::DoubleParam(d)),
        Some(ParameterChoice::Uint64Param(u)) => Some(Value::Int64Param(
            i64::try_from(u).map_err(|_| GatewayError::invalid(field, "must be at most 2^63 - 1"))?,
        )),
    };
    Ok(ParamValue { value })
}

fn infer_parameter(v: ParamValue) -> Option<InferParameter> {
    use param_value::Value;
    let choice = match v.value? {
        Value::BoolParam(b) => ParameterChoice::BoolParam(b),
        Value::Int64Param(i) => ParameterChoice::Int64Param(i),
        Value::DoubleParam(d) => ParameterChoice::DoubleParam(d),
        Value::StringParam(s) => ParameterChoice::StringParam(s),
    };
    Some(InferParameter { parameter_choice: Some(choice) })
}

/// The answer for `out`: raw outputs when the request was raw or an output
/// has no typed field (FP16), else typed.
fn answer(info: &ModelInfo, id: String, out: InferOutputs, raw: bool) -> Result<ModelInferResponse, GatewayError> {
    let raw = raw || out.tensors.iter().any(|t| t.datatype == "FP16");
    let unfit = |o: &InferOutputTensor| GatewayError::WorkerFailed {
        worker: "-".into(),
        detail: format!("output {:?}: a value does not fit its datatype {}", o.name, o.datatype),
    };
    let mut outputs = Vec::with_capacity(out.tensors.len());
    let mut raw_output_contents = Vec::new();
    for t in out.tensors {
        let mut o = InferOutputTensor {
            name: t.name.clone(),
            datatype: t.datatype.clone(),
            shape: t.shape.clone(),
            parameters: HashMap::new(),
            contents: None,
        };
        if raw {
            raw_output_contents.push(super::super::oip_bytes::encode(t).ok_or_else(|| unfit(&o))?);
        } else {
            o.contents = Some(typed_output(t).ok_or_else(|| unfit(&o))?);
        }
        outputs.push(o);
    }
    Ok(ModelInferResponse {
        model_name: info.name.clone(),
        model_version: info.version.clone(),
        id,
        parameters: out.parameters.into_iter().filter_map(|(k, v)| Some((k, infer_parameter(v)?))).collect(),
        outputs,
        raw_output_contents,
    })
}

/// Bits of an 8-, 16- or 32-bit integer datatype.
fn bits(datatype: &str) -> u32 {
    match datatype {
        "INT8" | "UINT8" => 8,
        "INT16" | "UINT16" => 16,
        _ => 32,
    }
}

/// `t`'s values in the typed field OIP gives its datatype; `None` when one
/// does not fit it.
fn typed_output(t: Tensor) -> Option<InferTensorContents> {
    let mut c = InferTensorContents::default();
    match t.datatype.as_str() {
        "BOOL" => c.bool_contents = t.bool_contents,
        "INT8" | "INT16" | "INT32" => {
            let half = 1i64 << (bits(&t.datatype) - 1);
            let fit = |v: i64| i32::try_from(v).ok().filter(|_| (-half..half).contains(&v));
            c.int_contents = t.int64_contents.into_iter().map(fit).collect::<Option<_>>()?;
        }
        "INT64" => c.int64_contents = t.int64_contents,
        "UINT8" | "UINT16" | "UINT32" => {
            let end = 1u64 << bits(&t.datatype);
            let fit = |v: u64| u32::try_from(v).ok().filter(|_| v < end);
            c.uint_contents = t.uint64_contents.into_iter().map(fit).collect::<Option<_>>()?;
        }
        "UINT64" => c.uint64_contents = t.uint64_contents,
        "FP32" => c.fp32_contents = t.fp32_contents,
        "FP64" => c.fp64_contents = t.fp64_contents,
        "BYTES" => c.bytes_contents = t.bytes_contents,
        _ => return None,
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::oip::model_infer_request::InferRequestedOutputTensor;

    fn input(name: &str, datatype: &str, shape: &[i64], contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            contents,
            ..Default::default()
        }
    }

    fn field(e: GatewayError) -> String {
        e.problem(None).field.unwrap_or_default()
    }

    #[test]
    fn raw_inputs_decode_in_order_and_their_count_must_match() {
        let f32s: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let words = [&[1u8, 0, 0, 0][..], b"a"].concat();
        let r = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[2], None), input("w", "BYTES", &[1], None)],
            raw_input_contents: vec![f32s.clone(), words],
            id: "r1".into(),
            ..Default::default()
        };
        let item = item(r.clone()).unwrap();
        assert_eq!((item.id.as_str(), item.inputs[0].fp32_contents.as_slice()), ("r1", &[1.5, -2.0][..]));
        assert_eq!(item.inputs[1].bytes_contents, vec![b"a".to_vec()]);
        let short = ModelInferRequest { raw_input_contents: vec![f32s.clone()], ..r.clone() };
        assert_eq!(field(super::item(short).unwrap_err()), "raw_input_contents");
        // Sizes are checked against the shape, the entry named.
        let odd = ModelInferRequest { raw_input_contents: vec![f32s[..6].to_vec(), vec![0; 4]], ..r.clone() };
        let e = super::item(odd).unwrap_err();
        assert!(e.problem(None).detail.contains("needs 8 bytes, 6 were sent"), "{e:?}");
        assert_eq!(field(e), "raw_input_contents[0]");
        // Raw and typed at once is refused.
        let mut both = r;
        both.inputs[0].contents = Some(InferTensorContents { fp32_contents: vec![1.0, 2.0], ..Default::default() });
        assert_eq!(field(super::item(both).unwrap_err()), "inputs[0].contents");
    }

    #[test]
    fn typed_inputs_take_the_field_their_datatype_has_and_no_other() {
        let typed = |datatype: &str, c: InferTensorContents| {
            let r = ModelInferRequest { inputs: vec![input("x", datatype, &[1], Some(c))], ..Default::default() };
            item(r)
        };
        let ints = InferTensorContents { int_contents: vec![-7], ..Default::default() };
        assert_eq!(typed("INT16", ints.clone()).unwrap().inputs[0].int64_contents, vec![-7]);
        let wide = InferTensorContents { int_contents: vec![128], ..Default::default() };
        assert_eq!(field(typed("INT8", wide).unwrap_err()), "inputs[0].data[0]");
        let wide = InferTensorContents { uint_contents: vec![65536], ..Default::default() };
        assert_eq!(field(typed("UINT16", wide).unwrap_err()), "inputs[0].data[0]");
        assert_eq!(field(typed("INT64", ints).unwrap_err()), "inputs[0].contents");
        let uints = InferTensorContents { uint_contents: vec![u32::MAX], ..Default::default() };
        assert_eq!(typed("UINT32", uints).unwrap().inputs[0].uint64_contents, vec![u64::from(u32::MAX)]);
        let floats = InferTensorContents { fp32_contents: vec![0.5], ..Default::default() };
        assert_eq!(field(typed("FP16", floats.clone()).unwrap_err()), "inputs[0].contents");
        assert_eq!(field(typed("FP8", floats.clone()).unwrap_err()), "inputs[0].datatype");
        // The shape holds 1 value, not 2.
        let two = InferTensorContents { fp32_contents: vec![0.5, 1.0], ..Default::default() };
        assert_eq!(field(typed("FP32", two).unwrap_err()), "inputs[0].data");
        assert_eq!(field(item(ModelInferRequest::default()).unwrap_err()), "inputs");
    }

    #[test]
    fn shared_memory_and_out_of_range_parameters_are_refused_by_name() {
        let x =
            || input("x", "FP32", &[1], Some(InferTensorContents { fp32_contents: vec![1.0], ..Default::default() }));
        let region = |s: &str| {
            let choice = ParameterChoice::StringParam(s.into());
            HashMap::from([(SHARED_MEMORY.to_owned(), InferParameter { parameter_choice: Some(choice) })])
        };
        let mut shm_in = ModelInferRequest { inputs: vec![x()], ..Default::default() };
        shm_in.inputs[0].parameters = region("r");
        assert_eq!(field(item(shm_in).unwrap_err()), "inputs[0].parameters.shared_memory_region");
        let shm_out = ModelInferRequest {
            inputs: vec![x()],
            outputs: vec![InferRequestedOutputTensor { name: "y".into(), parameters: region("r") }],
            ..Default::default()
        };
        assert_eq!(field(item(shm_out).unwrap_err()), "outputs[0].parameters.shared_memory_region");
        let big = InferParameter { parameter_choice: Some(ParameterChoice::Uint64Param(u64::MAX)) };
        let huge = ModelInferRequest {
            inputs: vec![x()],
            parameters: HashMap::from([("n".to_owned(), big)]),
            ..Default::default()
        };
        assert_eq!(field(item(huge).unwrap_err()), "parameters.n");
        let fine = InferParameter { parameter_choice: Some(ParameterChoice::Uint64Param(7)) };
        let ok = ModelInferRequest {
            inputs: vec![x()],
            parameters: HashMap::from([("n".to_owned(), fine)]),
            ..Default::default()
        };
        let value = item(ok).unwrap().parameters["n"].value.clone();
        assert_eq!(value, Some(param_value::Value::Int64Param(7)));
    }

    #[test]
    fn answers_mirror_the_request_and_fp16_goes_raw() {
        let info = ModelInfo { name: "echo".into(), version: "1".into(), ..Default::default() };
        let tensor = |name: &str, datatype: &str| Tensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![2],
            ..Default::default()
        };
        let i8s = Tensor { int64_contents: vec![-128, 127], ..tensor("a", "INT8") };
        let out = || InferOutputs { tensors: vec![i8s.clone()], ..Default::default() };
        let typed = answer(&info, "id".into(), out(), false).unwrap();
        assert_eq!((typed.model_name.as_str(), typed.id.as_str()), ("echo", "id"));
        assert_eq!(typed.outputs[0].contents.as_ref().unwrap().int_contents, vec![-128, 127]);
        assert!(typed.raw_output_contents.is_empty());
        let raw = answer(&info, String::new(), out(), true).unwrap();
        assert_eq!(
            (raw.outputs[0].contents.as_ref(), raw.raw_output_contents[0].as_slice()),
            (None, &[0x80, 0x7f][..])
        );
        let halves = Tensor { fp32_contents: vec![0.5, -3.0], ..tensor("h", "FP16") };
        let mixed = InferOutputs { tensors: vec![i8s.clone(), halves], ..Default::default() };
        let forced = answer(&info, String::new(), mixed, false).unwrap();
        assert_eq!(forced.raw_output_contents, vec![vec![0x80, 0x7f], vec![0, 0x38, 0, 0xc2]]);
        // A worker's value that does not fit its datatype is the worker's failure.
        for (datatype, wide) in [("INT8", 128), ("INT8", -129), ("INT16", 1 << 15), ("INT32", 1 << 31)] {
            let wide = Tensor { int64_contents: vec![wide, 0], ..tensor("a", datatype) };
            let unfit = answer(&info, String::new(), InferOutputs { tensors: vec![wide], ..Default::default() }, false);
            assert!(matches!(unfit, Err(GatewayError::WorkerFailed { .. })), "{datatype}: {unfit:?}");
        }
        let wide = Tensor { uint64_contents: vec![256], ..tensor("u", "UINT8") };
        let unfit = answer(&info, String::new(), InferOutputs { tensors: vec![wide], ..Default::default() }, false);
        assert!(matches!(unfit, Err(GatewayError::WorkerFailed { .. })), "{unfit:?}");
        let edge = Tensor { int64_contents: vec![-32768, 32767], ..tensor("a", "INT16") };
        let fits = answer(&info, String::new(), InferOutputs { tensors: vec![edge], ..Default::default() }, false);
        assert_eq!(fits.unwrap().outputs[0].contents.as_ref().unwrap().int_contents, vec![-32768, 32767]);
    }
}
