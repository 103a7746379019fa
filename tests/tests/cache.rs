//! The response cache end to end: real gateways, real workers, a real Redis.
//! Workers log each batch at debug, so the tests see what reached a model.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::Duration;

use infergate_e2e::{Gateway, Redis};
use serde_json::{Value, json};

const MINILM: &str = "[[pools]]\nname = \"minilm\"\nclass = \"infergate_worker.examples.minilm:MiniLM\"\n\
                      env = { INFERGATE_LOG_LEVEL = \"debug\" }\n";

/// Texts the workers embedded so far (sum of the batches they logged).
fn embedded(gw: &Gateway) -> usize {
    gw.log()
        .iter()
        .filter_map(|v| v["message"].as_str())
        .filter_map(|m| m.split("embed batch of ").nth(1)?.split(' ').next()?.parse::<usize>().ok())
        .sum()
}

fn embed(gw: &Gateway, input: Value, cache_control: Option<&str>) -> (String, Value) {
    let mut req = reqwest::blocking::Client::new()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "minilm", "input": input}));
    if let Some(cc) = cache_control {
        req = req.header("cache-control", cc);
    }
    let resp = req.send().unwrap();
    assert_eq!(resp.status(), 200);
    let cache = resp.headers()["x-cache"].to_str().unwrap().to_owned();
    (cache, resp.json().unwrap())
}

fn settle() {
    std::thread::sleep(Duration::from_millis(150)); // worker log lines arrive
}

#[test]
fn repeats_are_hits_that_never_reach_the_worker_and_no_cache_bypasses() {
    let gw = Gateway::start_logging(MINILM, "info,worker=debug").unwrap();
    let (first, a) = embed(&gw, json!("the cache keeps this"), None);
    settle();
    let calls = embedded(&gw);
    let (second, b) = embed(&gw, json!("the cache keeps this"), None);
    settle();
    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(a["data"], b["data"], "the same vector");
    assert_eq!(embedded(&gw), calls, "the hit did not reach the worker");
    // Several inputs: only the new one goes to the model.
    let (status, body) = embed(&gw, json!(["the cache keeps this", "and this is new"]), None);
    settle();
    assert_eq!(status, "partial");
    assert_eq!(body["data"][0]["embedding"], a["data"][0]["embedding"]);
    assert_eq!(embedded(&gw), calls + 1);
    // no-cache asks the model again.
    let (status, _) = embed(&gw, json!("the cache keeps this"), Some("no-cache"));
    settle();
    assert_eq!(status, "miss");
    assert_eq!(embedded(&gw), calls + 2);
}

#[test]
fn fifty_identical_concurrent_requests_make_one_worker_call() {
    let gw = Gateway::start_logging(MINILM, "info,worker=debug").unwrap();
    embed(&gw, json!("warm the worker"), None);
    settle();
    let before = embedded(&gw);
    let url = gw.url("/v1/embeddings");
    let statuses: Vec<String> =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async {
            let client = reqwest::Client::new();
            let calls = (0..50).map(|_| {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let body = json!({"model": "minilm", "input": "asked fifty times at once"});
                    let resp = client.post(url).json(&body).send().await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.headers()["x-cache"].to_str().unwrap().to_owned()
                }
            });
            futures::future::join_all(calls).await
        });
    settle();
    assert_eq!(embedded(&gw) - before, 1, "one text reached the worker for 50 requests");
    assert_eq!(statuses.iter().filter(|s| *s == "miss").count(), 1, "{statuses:?}");
}

#[test]
fn two_gateways_share_answers_through_redis() {
    let redis = Redis::start().unwrap();
    let config = format!("{MINILM}[redis]\nurl = \"{}\"\n", redis.url());
    let a = Gateway::start_logging(&config, "info,worker=debug").unwrap();
    let b = Gateway::start_beside_logging(&a, &config, "info,worker=debug").unwrap();
    let (status_a, from_a) = embed(&a, json!("shared between replicas"), None);
    let (status_b, from_b) = embed(&b, json!("shared between replicas"), None);
    settle();
    assert_eq!((status_a.as_str(), status_b.as_str()), ("miss", "hit"));
    assert_eq!(from_a["data"], from_b["data"]);
    // Gateway b's worker never embedded it; a's did, once.
    assert_eq!((embedded(&a), embedded(&b)), (1, 0));
    // And b's worker does log its batches: a text only b was asked embeds there.
    embed(&b, json!("only b saw this"), None);
    settle();
    assert_eq!(embedded(&b), 1);
}

fn chat(gw: &Gateway, content: &str, temperature: f64, stream: bool) -> (Option<String>, Option<String>, String) {
    let body = json!({"model": "echo", "stream": stream, "temperature": temperature,
                      "messages": [{"role": "user", "content": content}]});
    let resp = reqwest::blocking::Client::new().post(gw.url("/v1/chat/completions")).json(&body).send().unwrap();
    assert_eq!(resp.status(), 200);
    let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let (cache, similarity) = (header("x-cache"), header("x-cache-similarity"));
    (cache, similarity, resp.text().unwrap())
}

#[test]
fn chat_answers_come_back_exact_at_temperature_zero_and_by_meaning_when_asked() {
    let config = format!(
        "{MINILM}[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n\
         [cache.semantic]\nmodels = [\"echo\"]\nembedding_model = \"minilm\"\nthreshold = 0.95\n"
    );
    let gw = Gateway::start(&config).unwrap();
    // Exact: temperature 0.
    let (first, _, a) = chat(&gw, "repeat after me exactly", 0.0, false);
    let (second, _, b) = chat(&gw, "repeat after me exactly", 0.0, false);
    assert_eq!((first.as_deref(), second.as_deref()), (None, Some("hit")));
    let content = |s: &str| serde_json::from_str::<Value>(s).unwrap()["choices"][0]["message"]["content"].clone();
    assert_eq!(content(&a), content(&b));
    // By meaning: the same question in other case and punctuation, sampled.
    let (miss, _, original) = chat(&gw, "What is the capital of France?", 0.9, false);
    assert_eq!(miss, None);
    std::thread::sleep(Duration::from_millis(100));
    let (hit, similarity, answer) = chat(&gw, "what is the capital of france", 0.9, false);
    assert_eq!(hit.as_deref(), Some("semantic-hit"));
    let similarity: f64 = similarity.unwrap().parse().unwrap();
    assert!(similarity >= 0.95, "{similarity}");
    assert_eq!(content(&answer), content(&original), "the earlier answer, word for word");
    // A streaming hit replays as a normal stream.
    let (hit, _, sse) = chat(&gw, "What is the capital of France", 0.9, true);
    assert_eq!(hit.as_deref(), Some("semantic-hit"));
    assert!(
        sse.contains("\"content\":\"What is the capital of France?\"") && sse.ends_with("data: [DONE]\n\n"),
        "{sse}"
    );
    // A different question goes to the model.
    let (other, _, _) = chat(&gw, "How many legs does a spider have?", 0.9, false);
    assert_eq!(other, None);
}

/// gRPC `Generate` goes through the same chat cache as REST: a repeat at
/// temperature 0 is answered from it, with `x-cache: hit` metadata, and
/// never reaches the worker.
#[test]
fn a_grpc_generation_at_temperature_zero_repeated_is_a_cache_hit() {
    use infergate::proto::inference_client::InferenceClient;
    use infergate::proto::{ChatMessage, GenerateRequest, GenerationParams};

    let config = "[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n\
                  env = { INFERGATE_LOG_LEVEL = \"debug\" }\n";
    let gw = Gateway::start_logging(config, "info,worker=debug").unwrap();
    let generations = |gw: &Gateway| {
        gw.log().iter().filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with("generate"))).count()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ask = || {
        rt.block_on(async {
            let mut client = InferenceClient::connect(gw.grpc_url()).await.unwrap();
            let params = GenerationParams { temperature: 0.0, has_temperature: true, ..Default::default() };
            let req = GenerateRequest {
                model: "echo".into(),
                messages: vec![ChatMessage { role: "user".into(), content: "say it once more".into() }],
                params: Some(params),
                ..Default::default()
            };
            let resp = client.generate(req).await.unwrap();
            let cache = resp.metadata().get("x-cache").map(|v| v.to_str().unwrap().to_owned());
            let mut stream = resp.into_inner();
            let mut text = String::new();
            while let Some(chunk) = stream.message().await.unwrap() {
                text.push_str(&chunk.text);
            }
            (cache, text)
        })
    };
    let (first, a) = ask();
    settle();
    let reached = generations(&gw);
    let (second, b) = ask();
    settle();
    assert_eq!((first.as_deref(), second.as_deref()), (None, Some("hit")));
    assert_eq!(a, b, "the same answer");
    assert!(!a.is_empty());
    assert_eq!(generations(&gw), reached, "the hit did not reach the worker");
}

#[test]
fn the_semantic_cache_never_answers_one_tenant_with_anothers_answer() {
    use sha2::Digest;
    let digest = |key: &str| hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let config = format!(
        "{MINILM}[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n\
         [cache.semantic]\nmodels = [\"echo\"]\n\
         [auth]\nenabled = true\n\
         [[auth.keys]]\nid = \"a\"\nsha256 = \"{}\"\ntenant = \"acme\"\n\
         [[auth.keys]]\nid = \"g\"\nsha256 = \"{}\"\ntenant = \"globex\"\n",
        digest("key-acme"),
        digest("key-globex")
    );
    let gw = Gateway::start(&config).unwrap();
    let ask = |key: &str, content: &str| {
        let body = json!({"model": "echo", "temperature": 0.9, "messages": [{"role": "user", "content": content}]});
        let resp = reqwest::blocking::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let cache = resp.headers().get("x-cache").map(|v| v.to_str().unwrap().to_owned());
        std::thread::sleep(Duration::from_millis(100)); // answers are kept off the request path
        cache
    };
    assert_eq!(ask("key-acme", "What is the capital of France?"), None);
    assert_eq!(ask("key-acme", "what is the capital of france").as_deref(), Some("semantic-hit"));
    assert_eq!(ask("key-globex", "What is the capital of France?"), None, "acme's answer reached globex");
    assert_eq!(ask("key-globex", "what is the capital of France").as_deref(), Some("semantic-hit"));
}

#[test]
fn semantic_answers_reach_another_replica_through_redis() {
    let redis = Redis::start().unwrap();
    let config = format!(
        "{MINILM}[[pools]]\nname = \"echo\"\nclass = \"infergate_worker.examples.echo:Echo\"\n\
         [cache.semantic]\nmodels = [\"echo\"]\n[redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let a = Gateway::start(&config).unwrap();
    let b = Gateway::start_beside(&a, &config).unwrap();
    let (miss, _, from_a) = chat(&a, "Which river runs through Paris?", 0.9, false);
    assert_eq!(miss, None);
    std::thread::sleep(Duration::from_millis(200)); // kept, and mirrored to Redis
    let (hit, similarity, from_b) = chat(&b, "which river runs through paris", 0.9, false);
    assert_eq!(hit.as_deref(), Some("semantic-hit"), "replica b did not learn a's answer");
    assert!(similarity.unwrap().parse::<f64>().unwrap() >= 0.95);
    let content = |s: &str| serde_json::from_str::<Value>(s).unwrap()["choices"][0]["message"]["content"].clone();
    assert_eq!(content(&from_b), content(&from_a));
}
