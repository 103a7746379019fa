//! JSON <-> proto transcoding on the REST edge, per request, without I/O.
//!
//! Run: `cargo bench -p infergate-benches --bench transcode`

#![allow(clippy::unwrap_used, reason = "a benchmark harness: a failure here is a broken bench")]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use infergate::edge::json::{
    EmbeddingsRequest, EncodingFormat, InferRequestJson, embeddings_response, infer_item_from_json, infer_response_json,
};
use infergate::proto::{InferOutputs, ModelInfo};
use infergate_benches::{embeddings_request, oip_fp32_request};
use prost::Message;

fn oip_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("oip_request_json_to_proto");
    for n in [16usize, 384, 4096] {
        let body = serde_json::to_vec(&oip_fp32_request(n)).unwrap();
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &body, |b, body| {
            b.iter(|| {
                let req: InferRequestJson = serde_json::from_slice(black_box(body)).unwrap();
                let item = infer_item_from_json(&req).unwrap();
                black_box(item.encode_to_vec())
            });
        });
    }
    group.finish();
}

fn oip_response(c: &mut Criterion) {
    let mut group = c.benchmark_group("oip_response_proto_to_json");
    let info = ModelInfo { name: "m".into(), version: "1".into(), ..Default::default() };
    for n in [16usize, 384, 4096] {
        let text = oip_fp32_request(n).to_string();
        let req: InferRequestJson<'_> = serde_json::from_str(&text).unwrap();
        let item = infer_item_from_json(&req).unwrap();
        let wire = InferOutputs { tensors: item.inputs, parameters: Default::default() }.encode_to_vec();
        group.bench_with_input(BenchmarkId::from_parameter(n), &wire, |b, wire| {
            b.iter(|| {
                let out = InferOutputs::decode(black_box(wire.as_slice())).unwrap();
                black_box(serde_json::to_vec(&infer_response_json(&info, String::new(), out)).unwrap())
            });
        });
    }
    group.finish();
}

fn embeddings(c: &mut Criterion) {
    let mut group = c.benchmark_group("embeddings_round_trip");
    for n in [1usize, 32] {
        let body = serde_json::to_vec(&embeddings_request(n)).unwrap();
        let vectors: Vec<Vec<f32>> = (0..n).map(|i| (0..384).map(|j| (i * j) as f32 * 1e-4).collect()).collect();
        group.bench_with_input(BenchmarkId::new("float", n), &n, |b, _| {
            b.iter(|| {
                let req: EmbeddingsRequest = serde_json::from_slice(black_box(&body)).unwrap();
                let texts = req.texts().unwrap();
                black_box(texts.len());
                let resp = embeddings_response("minilm", vectors.clone(), 10, EncodingFormat::Float);
                black_box(serde_json::to_vec(&resp).unwrap())
            });
        });
        group.bench_with_input(BenchmarkId::new("base64", n), &n, |b, _| {
            b.iter(|| {
                let resp = embeddings_response("minilm", black_box(vectors.clone()), 10, EncodingFormat::Base64);
                black_box(serde_json::to_vec(&resp).unwrap())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, oip_request, oip_response, embeddings);
criterion_main!(benches);
