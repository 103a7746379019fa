//! Edge policy end to end: the real gateway, real echo workers, a real
//! `redis-server` shared by two gateway processes.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::Duration;

use infergate_e2e::{ECHO_POOL, Gateway, Redis};
use serde_json::{Value, json};

/// The API key the tests present; the config holds only its SHA-256.
const KEY: &str = "ig_e2e-policy-key-aaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn key_digest() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(KEY.as_bytes()))
}

fn auth_config(extra: &str) -> String {
    format!(
        "[auth]\nenabled = true\n{extra}\n[[auth.keys]]\nid = \"e2e\"\nsha256 = \"{}\"\ntenant = \"t1\"\n{ECHO_POOL}",
        key_digest()
    )
}

fn echo_body() -> Value {
    json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}]})
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn infer(gw: &Gateway, key: &str) -> reqwest::blocking::Response {
    client().post(gw.url("/v2/models/echo/infer")).bearer_auth(key).json(&echo_body()).send().unwrap()
}

#[test]
fn secrets_never_appear_in_logs() {
    let gw = Gateway::start_logging(&auth_config(""), "debug,h2=info,hyper=info,tower=info").unwrap();
    let secret = "ig_not-a-real-key-but-a-secret-all-the-same-0001";
    let c = client();
    let url = gw.url("/v2/models/echo/infer");
    assert_eq!(c.post(&url).bearer_auth(KEY).json(&echo_body()).send().unwrap().status(), 200);
    assert_eq!(c.post(&url).bearer_auth(secret).json(&echo_body()).send().unwrap().status(), 401);
    assert_eq!(c.post(&url).header("x-api-key", secret).json(&echo_body()).send().unwrap().status(), 401);
    assert_eq!(
        c.post(&url).header("cookie", format!("session={secret}")).json(&echo_body()).send().unwrap().status(),
        401
    );
    let with_query = format!("{url}?api_key={secret}");
    assert_eq!(c.post(&with_query).json(&echo_body()).send().unwrap().status(), 401);
    let jwt_like = format!("eyJhbGciOiJIUzI1NiJ9.{secret}.c2ln");
    assert_eq!(c.post(&url).bearer_auth(&jwt_like).json(&echo_body()).send().unwrap().status(), 401);
    std::thread::sleep(Duration::from_millis(300));
    let log = gw.log_text();
    assert!(log.contains("authentication failed"), "the refusals are logged (without the secret)");
    for s in [KEY, secret] {
        assert!(!log.contains(s), "a secret leaked into the log");
    }
    let metrics = client().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    assert!(!metrics.contains(secret), "a secret leaked into the metrics");
    // Bearer, x-api-key and the JWT-shaped token (no JWT configured: looked up as a key).
    assert_eq!(metric(&metrics, "infergate_auth_failures_total{reason=\"unknown_key\"}"), 3.0, "{metrics}");
    assert_eq!(metric(&metrics, "infergate_auth_failures_total{reason=\"missing\"}"), 2.0, "{metrics}");
}

/// The value of one sample in a Prometheus text exposition (0 when absent).
fn metric(text: &str, sample: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[test]
fn two_gateways_sharing_redis_admit_the_limit_together() {
    let redis = Redis::start().unwrap();
    // 5 requests per key for the whole test (the rate refills one every 1000 s).
    let extra = format!("[redis]\nurl = \"{}\"\n[limits]\nper_key = {{ rate = 0.001, burst = 5 }}\n", redis.url());
    let a = Gateway::start(&auth_config(&extra)).unwrap();
    let b = Gateway::start_beside(&a, &auth_config(&extra)).unwrap();
    let mut admitted = 0;
    let mut refused = 0;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let resp = infer(gw, KEY);
        match resp.status().as_u16() {
            200 => admitted += 1,
            429 => {
                refused += 1;
                assert!(resp.headers().contains_key("retry-after"));
                assert_eq!(resp.headers()["ratelimit-limit"], "5");
                let body: Value = resp.json().unwrap();
                assert_eq!(body["field"], "key.rate");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 5, "two replicas together admit the shared limit, not 5 each");
    assert_eq!(refused, 15);
}

#[test]
fn killing_redis_falls_back_to_local_limits_and_keeps_answering() {
    let mut redis = Redis::start().unwrap();
    let extra = format!(
        "[redis]\nurl = \"{}\"\nfallback = \"local\"\n[limits]\nper_key = {{ rate = 1000, burst = 1000 }}\n",
        redis.url()
    );
    let gw = Gateway::start(&auth_config(&extra)).unwrap();
    for _ in 0..5 {
        assert_eq!(infer(&gw, KEY).status(), 200);
    }
    redis.kill();
    let from = gw.log().len();
    for _ in 0..20 {
        assert_eq!(infer(&gw, KEY).status(), 200, "requests keep being answered without redis");
    }
    let down = gw.wait_log(from, Duration::from_secs(5), |v| v["message"] == "redis unavailable: limits fall back");
    assert!(down.is_some(), "the fallback is logged");
    let transitions = gw.log().iter().filter(|v| v["message"] == "redis unavailable: limits fall back").count();
    assert_eq!(transitions, 1, "logged once per transition, not per request");
    // ... and counted per decision. /metrics is public: no key needed.
    let metrics = client().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    let counted: f64 = metric(&metrics, "infergate_limits_fallback_total{fallback=\"local\"}");
    assert!(counted >= 1.0, "{metrics}");
}

#[test]
fn with_redis_down_and_fallback_deny_requests_get_503() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let extra = format!(
        "[redis]\nurl = \"redis://127.0.0.1:{port}\"\nfallback = \"deny\"\n[limits]\nper_key = {{ rate = 10 }}\n"
    );
    let gw = Gateway::start(&auth_config(&extra)).unwrap();
    let resp = infer(&gw, KEY);
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().unwrap();
    assert_eq!(body["type"], "urn:infergate:error:limits-unavailable");
    // Health stays answerable.
    assert_eq!(client().get(gw.url("/healthz")).send().unwrap().status(), 200);
}
