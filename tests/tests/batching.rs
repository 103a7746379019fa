//! Dynamic batching end to end: real gateway, real Python workers, the real
//! model. Workers run with debug logs, so they report each batch they get.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::Duration;

use infergate_e2e::{Gateway, cosine, reference_embeddings};
use serde_json::{Value, json};

/// Sizes of the batches the workers logged (`<kind> batch of N ...`).
fn worker_batches(gw: &Gateway, kind: &str) -> Vec<usize> {
    let prefix = format!("{kind} batch of ");
    gw.log()
        .iter()
        .filter_map(|v| v["message"].as_str())
        .filter_map(|m| m.split(&prefix).nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn concurrent_single_text_embeddings_are_batched_and_match_unbatched_vectors() {
    let config = "[[pools]]\nname = \"minilm\"\nclass = \"infergate_worker.examples.minilm:MiniLM\"\nworkers = 2\n\
                  env = { INFERGATE_LOG_LEVEL = \"debug\" }\n";
    let gw = Gateway::start_logging(config, "info,worker=debug").unwrap();
    let texts: Vec<String> = (0..256).map(|i| format!("sentence number {i} about gateways and batching")).collect();
    let url = gw.url("/v1/embeddings");
    let mark = worker_batches(&gw, "embed").len();
    let vectors: Vec<Vec<f32>> = rt().block_on(async {
        let client = reqwest::Client::new();
        let calls = texts.iter().map(|t| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let resp = client.post(url).json(&json!({"model": "minilm", "input": t})).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let body: Value = resp.json().await.unwrap();
                serde_json::from_value::<Vec<f32>>(body["data"][0]["embedding"].clone()).unwrap()
            }
        });
        futures::future::join_all(calls).await
    });
    std::thread::sleep(Duration::from_millis(200));
    let batches = worker_batches(&gw, "embed")[mark..].to_vec();
    let mean = batches.iter().sum::<usize>() as f64 / batches.len() as f64;
    eprintln!("256 requests -> {} worker calls, mean batch {mean:.1}: {batches:?}", batches.len());
    assert_eq!(batches.iter().sum::<usize>(), 256, "every text embedded exactly once");
    assert!(mean > 8.0, "mean batch size {mean:.1}");
    // Each caller got its own text's vector.
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let reference = reference_embeddings(&refs).unwrap();
    for (i, (got, want)) in vectors.iter().zip(&reference).enumerate() {
        let c = cosine(got, want);
        assert!(c >= 0.999, "text {i}: cosine {c}");
    }
}

#[test]
fn a_bad_item_in_a_batch_fails_only_its_caller() {
    let config = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n\
                  env = { INFERGATE_LOG_LEVEL = \"debug\" }\nbatching = { max_delay = \"20ms\" }\n";
    let gw = Gateway::start_logging(config, "info,worker=debug").unwrap();
    let url = gw.url("/v2/models/echo/infer");
    let statuses: Vec<(usize, u16, Value)> = rt().block_on(async {
        let client = reqwest::Client::new();
        let calls = (0..16).map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let mut body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [i as f32]}]});
                if i == 5 {
                    body["parameters"] = json!({"fail": true});
                }
                let resp = client.post(url).json(&body).send().await.unwrap();
                (i, resp.status().as_u16(), resp.json::<Value>().await.unwrap())
            }
        });
        futures::future::join_all(calls).await
    });
    let batches = worker_batches(&gw, "infer");
    eprintln!("16 requests -> worker batches {batches:?}");
    assert!(batches.iter().any(|n| *n > 1), "nothing was batched: {batches:?}");
    for (i, status, body) in statuses {
        if i == 5 {
            assert_eq!(status, 502, "{body}");
            assert!(body["detail"].as_str().unwrap().contains("asked to fail"), "{body}");
        } else {
            assert_eq!(status, 200, "request {i}: {body}");
            assert_eq!(body["outputs"][0]["data"], json!([i as f64]), "request {i} got another's answer");
        }
    }
}
