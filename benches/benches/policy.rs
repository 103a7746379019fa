//! The policy layer per request, in process: who is calling (API key, JWT),
//! the limit decision, and rendering a refusal. Together they bound how many
//! refusals one core can answer and what an admitted call pays.
//!
//! Run: `cargo bench -p infergate-benches --bench policy`

#![allow(clippy::expect_used, reason = "a benchmark harness: a failure here is a broken bench")]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use infergate::config::{Config, RawConfig};
use infergate::error::GatewayError;
use infergate::policy::Policy;
use sha2::Digest;

const KEY: &str = "ig_bench-policy-key-0123456789abcdefghijklmnopqrs";
const SECRET: &str = "a shared secret for the hs256 bench, 32+ bytes long";

fn policy(limits: &str) -> Arc<Policy> {
    let secret_file = std::env::temp_dir().join(format!("infergate-bench-hs-{}", std::process::id()));
    std::fs::write(&secret_file, SECRET).expect("temp file");
    let text = format!(
        "[auth]\nenabled = true\n[[auth.keys]]\nid = \"bench\"\nsha256 = \"{}\"\ntenant = \"t\"\n\
         [auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n[[auth.jwt.keys]]\nalg = \"HS256\"\nsecret_file = \"{}\"\n\
         {limits}\n[[pools]]\nname = \"p\"\nclass = \"x:Y\"\n",
        hex::encode(sha2::Sha256::digest(KEY)),
        secret_file.display()
    );
    let raw: RawConfig = toml::from_str(&text).expect("bench config parses");
    Policy::new(&Config::from_raw(raw).expect("bench config is valid")).expect("policy")
}

fn headers(token: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(http::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"));
    h
}

fn jwt() -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let claims = serde_json::json!({"iss": "i", "aud": "a", "sub": "u", "tenant": "t", "exp": exp});
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes())).expect("jwt")
}

fn identify(c: &mut Criterion) {
    let p = policy("");
    let key = headers(KEY);
    let token = headers(&jwt());
    let missing = http::HeaderMap::new();
    let mut group = c.benchmark_group("identify");
    group.bench_function("api_key", |b| b.iter(|| p.identify("/v1/embeddings", black_box(&key), None).is_ok()));
    group.bench_function("jwt_hs256", |b| b.iter(|| p.identify("/v1/embeddings", black_box(&token), None).is_ok()));
    group.bench_function("missing", |b| b.iter(|| p.identify("/v1/embeddings", black_box(&missing), None).is_err()));
    group.finish();
}

fn admit(c: &mut Criterion) {
    let roomy = "[limits]\nglobal = { rate = 1e9 }\nper_tenant = { rate = 1e9 }\n\
                 per_key = { rate = 1e9, tokens_per_minute = 1000000000, max_in_flight = 1000000 }\n";
    let p = policy(roomy);
    let caller = p.identify("/v1/embeddings", &headers(KEY), None).expect("caller");
    let none = policy("");
    let mut group = c.benchmark_group("admit");
    // The local path never waits, so polling it once completes it.
    group.bench_function("no_limits", |b| {
        b.iter(|| {
            futures::executor::block_on(none.admit(black_box(&caller), "m", infergate::policy::Tokens::NONE)).is_ok()
        })
    });
    group.bench_function("three_scopes_rate_tokens_in_flight", |b| {
        b.iter(|| {
            futures::executor::block_on(p.admit(black_box(&caller), "m", infergate::policy::Tokens::input(10)))
                .map(|a| a.settle(Some(7)))
        })
    });
    let spent = policy("[limits]\nper_key = { rate = 0.0001, burst = 1 }\n");
    let caller = spent.identify("/v1/embeddings", &headers(KEY), None).expect("caller");
    let _ = futures::executor::block_on(spent.admit(&caller, "m", infergate::policy::Tokens::NONE));
    group.bench_function("refused_429_with_problem_body", |b| {
        b.iter(|| {
            let err =
                futures::executor::block_on(spent.admit(black_box(&caller), "m", infergate::policy::Tokens::NONE))
                    .err();
            err.map(|e| e.into_http(Some("req-1")))
        })
    });
    group.bench_function("refused_401_problem_body", |b| b.iter(|| GatewayError::Unauthenticated.into_http(None)));
    group.finish();
}

criterion_group!(benches, identify, admit);
criterion_main!(benches);
