use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::call::Deadline;
use crate::policy::Caller;
use crate::proto::{GenerateRequest, ModelEntry, ModelKind, Tensor};
use crate::upstream::{ChunkStream, PoolStatus};

/// Embeds a text as `[len]` (slowly, so concurrent calls overlap); counts
/// every text it is asked for.
#[derive(Default)]
struct Counting {
    texts: Mutex<Vec<String>>,
    infers: AtomicUsize,
}

fn info() -> ModelInfo {
    ModelInfo { name: "m".into(), version: "1".into(), kind: ModelKind::Embed as i32, ..Default::default() }
}

#[async_trait::async_trait]
impl Upstream for Counting {
    fn models(&self) -> Vec<ModelEntry> {
        vec![ModelEntry { info: Some(info()), pool: "p".into(), ready: true, ..Default::default() }]
    }
    fn model(&self, _name: &str) -> Result<ModelEntry, GatewayError> {
        Ok(self.models().remove(0))
    }
    fn status(&self) -> Vec<PoolStatus> {
        Vec::new()
    }
    async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
        self.texts.lock().unwrap().extend(call.payload.iter().cloned());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let vectors = call.payload.iter().map(|t| vec![t.len() as f32]).collect();
        Ok(EmbedOutput { model: info(), vectors, prompt_tokens: 3 })
    }
    async fn infer(&self, call: Call<InferItem>) -> Result<(ModelInfo, InferOutputs), GatewayError> {
        self.infers.fetch_add(1, Ordering::Relaxed);
        if call.payload.parameters.contains_key("fail") {
            return Err(GatewayError::ModelRejected { detail: "no".into() });
        }
        Ok((info(), InferOutputs { tensors: call.payload.inputs, ..Default::default() }))
    }
}

fn call<P>(payload: P, tenant: &str) -> Call<P> {
    let mut caller = Caller::anonymous([127, 0, 0, 1].into());
    caller.tenant = tenant.into();
    Call {
        model: "m".into(),
        payload,
        deadline: Deadline::after(Duration::from_secs(5)),
        request_id: "r".into(),
        caller: Arc::new(caller),
        pool: None,
        class: Default::default(),
    }
}

fn texts(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| (*s).to_owned()).collect()
}

fn cache() -> ResponseCache {
    let rules = PoolRules { nondeterministic: vec!["random".into()], deterministic: Vec::new() };
    ResponseCache::new(CacheConfig::default(), None, rules).unwrap()
}

const ALL: CacheMode = CacheMode { lookup: true, store: true };

#[tokio::test]
async fn a_second_identical_request_is_a_hit_and_never_reaches_the_model() {
    let (c, up) = (cache(), Counting::default());
    let (out, status) = c.embed(&up, call(texts(&["hello"]), "t"), ALL).await.unwrap();
    assert_eq!((out.vectors, status), (vec![vec![5.0]], Some(CacheStatus::Miss)));
    let (out, status) = c.embed(&up, call(texts(&["hello"]), "t"), ALL).await.unwrap();
    assert_eq!((out.vectors, out.prompt_tokens, status), (vec![vec![5.0]], 3, Some(CacheStatus::Hit)));
    assert_eq!(*up.texts.lock().unwrap(), ["hello"]);
}

#[tokio::test]
async fn only_the_misses_of_a_multi_input_request_reach_the_model_in_order() {
    let (c, up) = (cache(), Counting::default());
    c.embed(&up, call(texts(&["a", "bbb"]), "t"), ALL).await.unwrap();
    let (out, status) = c.embed(&up, call(texts(&["cc", "a", "bbb", "dddd"]), "t"), ALL).await.unwrap();
    assert_eq!(out.vectors, vec![vec![2.0], vec![1.0], vec![3.0], vec![4.0]]);
    assert_eq!(status, Some(CacheStatus::Partial));
    let mut asked = up.texts.lock().unwrap().clone();
    asked.sort();
    assert_eq!(asked, ["a", "bbb", "cc", "dddd"], "each text computed once");
}

#[tokio::test]
async fn identical_requests_in_flight_wait_for_the_first_singleflight() {
    let (c, up) = (cache(), Counting::default());
    let calls = (0..50).map(|_| c.embed(&up, call(texts(&["same"]), "t"), ALL));
    let answers = futures::future::join_all(calls).await;
    assert!(answers.iter().all(|a| a.as_ref().unwrap().0.vectors == vec![vec![4.0]]));
    assert_eq!(up.texts.lock().unwrap().len(), 1, "one model call for 50 identical requests");
    let hits = answers.iter().filter(|a| a.as_ref().unwrap().1 == Some(CacheStatus::Hit)).count();
    assert_eq!(hits, 49);
}

#[tokio::test]
async fn answers_are_never_shared_across_tenants() {
    let (c, up) = (cache(), Counting::default());
    c.embed(&up, call(texts(&["x"]), "acme"), ALL).await.unwrap();
    let (_, status) = c.embed(&up, call(texts(&["x"]), "globex"), ALL).await.unwrap();
    assert_eq!(status, Some(CacheStatus::Miss));
    assert_eq!(up.texts.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn no_cache_asks_the_model_and_no_store_keeps_nothing() {
    let (c, up) = (cache(), Counting::default());
    let no_cache = CacheMode::from_cache_control(Some("no-cache"));
    let no_store = CacheMode::from_cache_control(Some("max-age=0, No-Store"));
    assert_eq!(
        (no_cache, no_store),
        (CacheMode { lookup: false, store: true }, CacheMode { lookup: true, store: false })
    );
    c.embed(&up, call(texts(&["k"]), "t"), ALL).await.unwrap();
    let (_, status) = c.embed(&up, call(texts(&["k"]), "t"), no_cache).await.unwrap();
    assert_eq!(status, Some(CacheStatus::Miss), "no-cache bypasses the stored answer");
    assert_eq!(up.texts.lock().unwrap().len(), 2);
    c.embed(&up, call(texts(&["fresh"]), "t"), no_store).await.unwrap();
    let (_, status) = c.embed(&up, call(texts(&["fresh"]), "t"), ALL).await.unwrap();
    assert_eq!(status, Some(CacheStatus::Miss), "no-store kept nothing");
}

fn item(x: f32, params: &[(&str, i64)]) -> InferItem {
    InferItem {
        id: format!("id-{x}"),
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            fp32_contents: vec![x],
            ..Default::default()
        }],
        outputs: Vec::new(),
        parameters: params
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    crate::proto::ParamValue { value: Some(crate::proto::param_value::Value::Int64Param(*v)) },
                )
            })
            .collect(),
    }
}

#[tokio::test]
async fn tensor_calls_are_cached_by_canonical_input_errors_are_not_and_nondeterministic_pools_never() {
    let (c, up) = (cache(), Counting::default());
    let a = item(1.0, &[("a", 1), ("b", 2), ("c", 3)]);
    c.infer(&up, call(a.clone(), "t"), ALL).await.unwrap();
    // The same input with another id and parameters in another order is the same call.
    let mut again = item(1.0, &[("c", 3), ("b", 2), ("a", 1)]);
    again.id = "other".into();
    let ((_, out), status) = c.infer(&up, call(again, "t"), ALL).await.unwrap();
    assert_eq!((status, out.tensors[0].fp32_contents.clone()), (Some(CacheStatus::Hit), vec![1.0]));
    assert_eq!(up.infers.load(Ordering::Relaxed), 1);
    // A failure is not kept.
    let bad = item(2.0, &[("fail", 1)]);
    assert!(c.infer(&up, call(bad.clone(), "t"), ALL).await.is_err());
    assert!(c.infer(&up, call(bad, "t"), ALL).await.is_err());
    assert_eq!(up.infers.load(Ordering::Relaxed), 3);
    // A pool marked deterministic = false is never cached.
    let mut random = call(item(1.0, &[]), "t");
    random.pool = Some("random".into());
    let (_, status) = c.infer(&up, random, ALL).await.unwrap();
    assert_eq!(status, None);
}

#[test]
fn values_survive_the_redis_encoding() {
    let e = Value::Embedding(Arc::new((vec![0.25, -1.5, 3.0], 7)));
    let Some(Value::Embedding(back)) = Value::decode(&e.encode(), 1 << 20) else { panic!("not an embedding") };
    assert_eq!(*back, (vec![0.25, -1.5, 3.0], 7));
    let o = Value::Outputs(Arc::new(InferOutputs { tensors: item(4.0, &[]).inputs, ..Default::default() }));
    let Some(Value::Outputs(back)) = Value::decode(&o.encode(), 1 << 20) else { panic!("not outputs") };
    assert_eq!(back.tensors[0].fp32_contents, vec![4.0]);
    assert!(Value::decode(b"zgarbage", 1 << 20).is_none());
    // A size prefix claiming 4 GiB is refused before anything is allocated.
    let mut poisoned = o.encode();
    poisoned[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Value::decode(&poisoned, 1 << 20).is_none());
    // An honest value larger than the bound is refused too.
    assert!(Value::decode(&o.encode(), 8).is_none());
}

mod chat {
    use super::*;
    use crate::cache::chat::{ChatHit, SemanticConfig, replay};
    use futures::StreamExt;

    use crate::proto::{ChatMessage, GenerateChunk, GenerationParams};
    use crate::route::Target;

    /// Embeds a text as its letter counts (similar texts, similar vectors);
    /// answers chat with "answer N", N counting the generations.
    #[derive(Default)]
    struct Letters {
        generations: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Upstream for Letters {
        fn models(&self) -> Vec<ModelEntry> {
            vec![ModelEntry { info: Some(info()), pool: "p".into(), ready: true, ..Default::default() }]
        }
        fn model(&self, _name: &str) -> Result<ModelEntry, GatewayError> {
            Ok(self.models().remove(0))
        }
        fn status(&self) -> Vec<PoolStatus> {
            Vec::new()
        }
        async fn embed(&self, call: Call<Vec<String>>) -> Result<EmbedOutput, GatewayError> {
            let vectors = call
                .payload
                .iter()
                .map(|t| {
                    let mut v = vec![0f32; 26];
                    t.bytes().filter(u8::is_ascii_lowercase).for_each(|b| v[usize::from(b - b'a')] += 1.0);
                    v
                })
                .collect();
            Ok(EmbedOutput { model: info(), vectors, prompt_tokens: 1 })
        }
        async fn generate(&self, _call: Call<GenerateRequest>) -> Result<ChunkStream, GatewayError> {
            let n = self.generations.fetch_add(1, Ordering::Relaxed);
            let chunk = GenerateChunk { text: format!("answer {n}"), ..Default::default() };
            let done = GenerateChunk {
                finish_reason: crate::proto::FinishReason::Stop as i32,
                usage: Some(crate::proto::Usage { prompt_tokens: 2, completion_tokens: 2 }),
                ..Default::default()
            };
            Ok(futures::stream::iter([Ok(chunk), Ok(done)]).boxed())
        }
    }

    fn chat_cache(semantic_models: &[&str]) -> Arc<ResponseCache> {
        let semantic = SemanticConfig {
            models: semantic_models.iter().map(|m| (*m).to_owned()).collect(),
            embedding_model: "m".into(),
            threshold: 0.95,
            max_entries: 10,
        };
        let config = CacheConfig { semantic, ..CacheConfig::default() };
        Arc::new(ResponseCache::new(config, None, PoolRules::default()).unwrap())
    }

    fn ask(text: &str, temperature: Option<f32>, tenant: &str) -> Call<GenerateRequest> {
        let params = GenerationParams {
            temperature: temperature.unwrap_or(0.0),
            has_temperature: temperature.is_some(),
            ..Default::default()
        };
        let req = GenerateRequest {
            model: "chat".into(),
            messages: vec![ChatMessage { role: "user".into(), content: text.into() }],
            params: Some(params),
            user: String::new(),
        };
        call(req, tenant)
    }

    fn target() -> Target {
        Target { variant: None, pool: None, model: "chat".into() }
    }

    /// Ask through the cache the way the chat handler does; returns the
    /// text and how it was answered.
    async fn through(c: &Arc<ResponseCache>, up: &Letters, req: Call<GenerateRequest>) -> (String, Option<ChatHit>) {
        let (stream, hit) = match c.chat_lookup(up, &req, "chat", &target(), ALL).await {
            Ok((answer, hit)) => (replay(&answer), Some(hit)),
            Err(keep) => (c.recording(up.generate(req).await.unwrap(), keep), None),
        };
        let chunks: Vec<_> = stream.collect().await;
        tokio::time::sleep(Duration::from_millis(10)).await; // the recorder keeps the answer off the path
        (chunks.into_iter().map(|c| c.unwrap().text).collect(), hit)
    }

    #[tokio::test]
    async fn temperature_zero_answers_are_exact_hits_others_are_not_cached() {
        let (c, up) = (chat_cache(&[]), Letters::default());
        assert_eq!(through(&c, &up, ask("hello there", Some(0.0), "t")).await, ("answer 0".into(), None));
        assert_eq!(
            through(&c, &up, ask("hello there", Some(0.0), "t")).await,
            ("answer 0".into(), Some(ChatHit::Exact))
        );
        // Sampling answers differ each time: never cached.
        assert_eq!(through(&c, &up, ask("hello there", Some(0.7), "t")).await.1, None);
        assert_eq!(through(&c, &up, ask("hello there", Some(0.7), "t")).await.1, None);
        assert_eq!(through(&c, &up, ask("hello there", None, "t")).await.1, None);
        assert_eq!(up.generations.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_close_enough_prompt_of_the_same_tenant_is_a_semantic_hit_never_another_tenants() {
        let (c, up) = (chat_cache(&["chat"]), Letters::default());
        let first = through(&c, &up, ask("What is the capital of France?", Some(0.8), "acme")).await;
        assert_eq!(first, ("answer 0".into(), None));
        let (text, hit) = through(&c, &up, ask("what is the capital of   france", Some(0.8), "acme")).await;
        assert_eq!(text, "answer 0");
        assert!(matches!(hit, Some(ChatHit::Semantic(s)) if s >= 0.95), "{hit:?}");
        // Another tenant asking the same never sees acme's answer.
        let (text, hit) = through(&c, &up, ask("What is the capital of France?", Some(0.8), "globex")).await;
        assert_eq!((text.as_str(), hit), ("answer 1", None));
        // A different question is not close enough.
        let (_, hit) = through(&c, &up, ask("Describe the boiling point of water", Some(0.8), "acme")).await;
        assert_eq!(hit, None);
        assert_eq!(up.generations.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn models_not_named_are_not_matched_by_meaning() {
        let (c, up) = (chat_cache(&["other"]), Letters::default());
        through(&c, &up, ask("same words", Some(0.8), "t")).await;
        assert_eq!(through(&c, &up, ask("same words", Some(0.8), "t")).await.1, None);
    }
}

#[test]
fn tensor_keys_differ_with_any_part_of_the_tensor() {
    use sha2::{Digest, Sha256};
    let digest = |t: crate::proto::Tensor| {
        let mut h = Sha256::new();
        super::tensor_digest(&t, &mut h);
        h.finalize().to_vec()
    };
    let base = crate::proto::Tensor {
        name: "x".into(),
        datatype: "FP32".into(),
        shape: vec![2],
        fp32_contents: vec![1.0, 2.0],
        ..Default::default()
    };
    let same = digest(base.clone());
    assert_eq!(same, digest(base.clone()));
    let variants = [
        crate::proto::Tensor { name: "y".into(), ..base.clone() },
        crate::proto::Tensor { datatype: "FP16".into(), ..base.clone() },
        crate::proto::Tensor { shape: vec![1, 2], ..base.clone() },
        crate::proto::Tensor { fp32_contents: vec![1.0, 2.5], ..base.clone() },
        // The same bytes in another field are another tensor.
        crate::proto::Tensor { fp32_contents: vec![], int64_contents: vec![0x4000_0000_3f80_0000], ..base.clone() },
        crate::proto::Tensor { bytes_contents: vec![b"a".to_vec()], ..base.clone() },
    ];
    for v in variants {
        assert_ne!(digest(v.clone()), same, "{v:?}");
    }
    // Long tensors cross the hash's buffer in pieces: still one answer.
    let long = crate::proto::Tensor { fp64_contents: (0..10_000).map(f64::from).collect(), ..base.clone() };
    let mut longer = long.clone();
    longer.fp64_contents[9_999] = 0.5;
    assert_ne!(digest(long), digest(longer));
}
