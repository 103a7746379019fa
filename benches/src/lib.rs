//! Benchmarks for infergate: the `infergate-bench` load generator ([`load`]),
//! and payload helpers shared by the criterion benches in `benches/`.

pub mod load;

use serde_json::{Value, json};

/// An Open Inference Protocol request with one FP32 tensor of `n` values,
/// shaped `[1, n]` (nested rows, as clients usually send them).
pub fn oip_fp32_request(n: usize) -> Value {
    let row: Vec<f64> = (0..n).map(|i| (i as f64) * 0.001).collect();
    json!({
        "id": "bench",
        "parameters": {"priority": 1},
        "inputs": [{"name": "input", "shape": [1, n], "datatype": "FP32", "data": [row]}],
    })
}

/// An OpenAI embeddings request with `n` short texts.
pub fn embeddings_request(n: usize) -> Value {
    let input: Vec<String> = (0..n).map(|i| format!("sentence number {i} about gateways")).collect();
    json!({"model": "minilm", "input": input})
}
