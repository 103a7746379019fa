//! What each request carries: a fixed body from a file, or embeddings
//! requests built from generated texts (all unique, or Zipf-repeated so a
//! cache would see realistic reuse).

use bytes::Bytes;
use infergate::edge::json::{InferRequestJson, infer_item_from_json};
use infergate::proto::oip::ModelInferRequest;
use infergate::proto::oip::model_infer_request::InferInputTensor;
use infergate::proto::{EmbedRequest, InferRequest};

const WORDS: &[&str] = &[
    "gateway",
    "worker",
    "model",
    "latency",
    "batch",
    "tensor",
    "python",
    "rust",
    "request",
    "queue",
    "deadline",
    "embedding",
    "token",
    "stream",
    "cache",
    "pool",
    "socket",
    "kernel",
    "vector",
    "signal",
    "shard",
    "replica",
];

/// A sentence that differs for every `n` (8 to 23 words).
pub fn unique_text(n: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(n);
    let len = 8 + rng.usize(..16);
    let mut words: Vec<&str> = (0..len).map(|_| WORDS[rng.usize(..WORDS.len())]).collect();
    words.push("#");
    format!("{} {n}", words.join(" "))
}

/// Zipf(s) over `n` ranks: rank 0 is the most frequent.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// Precompute the CDF; `n` at least 1, `s` > 0.
    pub fn new(n: usize, s: f64) -> Self {
        let weights: Vec<f64> = (1..=n.max(1)).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        Self { cdf: cdf.collect() }
    }

    /// Draw a rank.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let u = rng.f64();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// Where texts come from.
#[derive(Debug, Clone)]
pub enum Texts {
    Unique,
    Zipf(Zipf),
}

/// The request payload of a run.
#[derive(Debug, Clone)]
pub enum Payload {
    /// The same body every time (HTTP), or its gRPC transcodings:
    /// infergate's `Inference/Infer`, and OIP's `ModelInfer` with raw
    /// contents, as tritonclient.grpc sends it.
    Fixed { body: Bytes, grpc: Option<InferRequest>, oip: Option<Box<ModelInferRequest>> },
    /// `/v1/embeddings` or `Inference/Embed` with `inputs` texts per request.
    Embed { model: String, inputs: usize, texts: Texts },
}

impl Payload {
    /// A fixed body read from a file; an OIP infer body is also prepared for gRPC.
    pub fn fixed(body: Bytes, model: &str) -> Self {
        let grpc = serde_json::from_slice::<InferRequestJson>(&body).ok().and_then(|req| {
            let item = infer_item_from_json(&req).ok()?;
            Some(InferRequest {
                model: model.to_owned(),
                id: item.id,
                inputs: item.inputs,
                outputs: item.outputs,
                parameters: item.parameters,
            })
        });
        let oip = grpc.as_ref().and_then(oip_request).map(Box::new);
        Self::Fixed { body, grpc, oip }
    }

    /// The HTTP body of request number `i`.
    pub fn http_body(&self, i: u64) -> Bytes {
        match self {
            Self::Fixed { body, .. } => body.clone(),
            Self::Embed { model, inputs, texts } => {
                let input = texts_for(i, *inputs, texts);
                Bytes::from(
                    serde_json::to_vec(&serde_json::json!({ "model": model, "input": input })).unwrap_or_default(),
                )
            }
        }
    }

    /// The gRPC embed request number `i`, when the payload is texts.
    pub fn grpc_embed(&self, i: u64) -> Option<EmbedRequest> {
        match self {
            Self::Embed { model, inputs, texts } => {
                Some(EmbedRequest { model: model.clone(), inputs: texts_for(i, *inputs, texts), user: String::new() })
            }
            Self::Fixed { .. } => None,
        }
    }

    /// The gRPC infer request, when the payload is a fixed OIP body.
    pub fn grpc_infer(&self) -> Option<&InferRequest> {
        match self {
            Self::Fixed { grpc, .. } => grpc.as_ref(),
            Self::Embed { .. } => None,
        }
    }

    /// The OIP gRPC `ModelInfer` request, when the payload is a fixed OIP body.
    pub fn oip_infer(&self) -> Option<&ModelInferRequest> {
        match self {
            Self::Fixed { oip, .. } => oip.as_deref(),
            Self::Embed { .. } => None,
        }
    }
}

/// `req` as OIP's `ModelInferRequest`, every input in `raw_input_contents`.
fn oip_request(req: &InferRequest) -> Option<ModelInferRequest> {
    let mut out = ModelInferRequest { model_name: req.model.clone(), id: req.id.clone(), ..Default::default() };
    for t in &req.inputs {
        out.inputs.push(InferInputTensor {
            name: t.name.clone(),
            datatype: t.datatype.clone(),
            shape: t.shape.clone(),
            ..Default::default()
        });
        out.raw_input_contents.push(infergate::edge::oip_bytes::encode(t.clone())?);
    }
    Some(out)
}

/// The `model_inputs` texts of request number `i`.
fn texts_for(i: u64, model_inputs: usize, texts: &Texts) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(i ^ 0x9e37_79b9_7f4a_7c15);
    (0..model_inputs as u64)
        .map(|k| match texts {
            Texts::Unique => unique_text(i * model_inputs as u64 + k),
            Texts::Zipf(z) => unique_text(z.sample(&mut rng) as u64),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_texts_differ() {
        let texts: std::collections::HashSet<_> = (0..1000).map(unique_text).collect();
        assert_eq!(texts.len(), 1000);
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let z = Zipf::new(100, 1.1);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut hits = [0usize; 100];
        for _ in 0..20_000 {
            hits[z.sample(&mut rng)] += 1;
        }
        assert!(hits[0] > hits[1] && hits[1] > hits[10] && hits[10] > hits[90], "{:?}", &hits[..12]);
        assert!(hits.iter().all(|h| *h < 20_000));
    }

    #[test]
    fn embed_bodies_carry_the_requested_inputs() {
        let p = Payload::Embed { model: "m".into(), inputs: 3, texts: Texts::Unique };
        let v: serde_json::Value = serde_json::from_slice(&p.http_body(7)).unwrap();
        assert_eq!(v["input"].as_array().unwrap().len(), 3);
        assert_eq!(p.grpc_embed(7).unwrap().inputs.len(), 3);
        assert_ne!(p.http_body(7), p.http_body(8));
    }

    #[test]
    fn fixed_oip_bodies_are_transcoded_for_grpc() {
        let body = r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}"#;
        let p = Payload::fixed(Bytes::from(body), "echo");
        assert_eq!(p.grpc_infer().unwrap().inputs[0].fp32_contents, vec![1.0]);
        let oip = p.oip_infer().unwrap();
        assert_eq!((oip.model_name.as_str(), oip.raw_input_contents[0].as_slice()), ("echo", &[0, 0, 0x80, 0x3f][..]));
    }
}
