//! Routing end to end: aliases with a sticky canary, a tier rule and pins
//! (callers told apart by JWT subject), and a fallback when the primary
//! pool's only worker dies. Real gateway, real echo workers.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use infergate_e2e::{Gateway, RemoteWorker};
use serde_json::{Value, json};

const SECRET: &str = "routing e2e shared secret, long enough for HS256";
const ECHO: &str = "infergate_worker.examples.echo:Echo";
/// The fallback scenarios repeat one request to watch where it goes: no
/// response cache (it would answer them, with the variant that was cached).
const NO_CACHE: &str = "[cache]\nenabled = false\n";

fn echo_body() -> Value {
    json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}]})
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn token(sub: &str, tier: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = json!({"iss": "e2e", "aud": "infergate", "sub": sub, "tenant": "t", "tier": tier, "exp": exp});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).unwrap()
}

/// POST an echo call to `model`; the status and the variant that answered.
fn call(gw: &Gateway, model: &str, bearer: Option<&str>, pin: Option<&str>) -> (u16, String) {
    let mut req = client().post(gw.url(&format!("/v2/models/{model}/infer"))).json(&echo_body());
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(v) = pin {
        req = req.header("x-model-version", v);
    }
    let resp = req.send().unwrap();
    let variant = resp.headers().get("x-infergate-variant").map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), variant.unwrap_or_default())
}

#[test]
fn canary_split_is_sticky_per_user_a_vip_goes_to_its_pool_and_pins_win() {
    let secret = std::env::temp_dir().join(format!("infergate-routing-{}", std::process::id()));
    std::fs::write(&secret, SECRET).unwrap();
    let config = format!(
        "[auth]\nenabled = true\n[auth.jwt]\nissuer = \"e2e\"\naudience = \"infergate\"\n\
         [[auth.jwt.keys]]\nalg = \"HS256\"\nsecret_file = \"{}\"\n\
         [[pools]]\nname = \"stable\"\nclass = \"{ECHO}\"\n\
         [[pools]]\nname = \"canary\"\nclass = \"{ECHO}\"\n\
         [[pools]]\nname = \"vip\"\nclass = \"{ECHO}\"\n\
         [[aliases]]\nname = \"tensors\"\ntiers = {{ vip = \"vip\" }}\n\
         [[aliases.variants]]\nname = \"v1\"\npool = \"stable\"\nmodel = \"echo\"\nweight = 90\n\
         [[aliases.variants]]\nname = \"v2\"\npool = \"canary\"\nmodel = \"echo\"\nweight = 10\n\
         [[aliases.variants]]\nname = \"vip\"\npool = \"vip\"\nmodel = \"echo\"\n",
        secret.display()
    );
    let gw = Gateway::start(&config).unwrap();
    let tokens: Vec<String> = (0..200).map(|u| token(&format!("user-{u}"), "standard")).collect();
    let mut seen: HashMap<usize, String> = HashMap::new();
    let mut canary = 0;
    for i in 0..2000 {
        let user = i % 200;
        let (status, variant) = call(&gw, "tensors", Some(&tokens[user]), None);
        assert_eq!(status, 200);
        if variant == "v2" {
            canary += 1;
        } else {
            assert_eq!(variant, "v1");
        }
        let first = seen.entry(user).or_insert_with(|| variant.clone());
        assert_eq!(*first, variant, "user-{user} moved between variants");
    }
    let share = f64::from(canary) / 2000.0;
    eprintln!("canary share over 2,000 requests from 200 users: {share:.3}");
    assert!((0.07..=0.13).contains(&share), "canary share {share}, want 0.10 +- 0.03");

    let vip = token("big-spender", "vip");
    for _ in 0..20 {
        assert_eq!(call(&gw, "tensors", Some(&vip), None), (200, "vip".to_owned()));
    }
    // A pin wins over the split, for a v1 user and a v2 user alike.
    for user in [0, 1, 2, 3] {
        assert_eq!(call(&gw, "tensors", Some(&tokens[user]), Some("v2")), (200, "v2".to_owned()));
        assert_eq!(call(&gw, "tensors", Some(&tokens[user]), Some("v1")), (200, "v1".to_owned()));
    }
    assert_eq!(call(&gw, "tensors", Some(&tokens[0]), Some("v9")).0, 400);
    // The alias is listed beside the models it routes to.
    let models: Value = client().get(gw.url("/v1/models")).bearer_auth(&tokens[0]).send().unwrap().json().unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"tensors") && ids.contains(&"echo"), "{ids:?}");
    let _ = std::fs::remove_file(secret);
}

#[test]
fn when_the_primary_pool_loses_its_workers_the_fallback_answers_and_says_so() {
    let mut worker = RemoteWorker::start(ECHO).unwrap();
    let config = format!(
        "[[pools]]\nname = \"primary\"\naddresses = [\"{}\"]\n\
         [[pools]]\nname = \"backup\"\nclass = \"{ECHO}\"\n\
         [[aliases]]\nname = \"tensors\"\nfallbacks = [\"backup\"]\n\
         [[aliases.variants]]\nname = \"primary\"\npool = \"primary\"\nmodel = \"echo\"\n\
         [[aliases.variants]]\nname = \"backup\"\npool = \"backup\"\nmodel = \"echo\"\n{NO_CACHE}",
        worker.addr()
    );
    {
        let gw = Gateway::start(&config).unwrap();
        for _ in 0..10 {
            assert_eq!(call(&gw, "tensors", None, None), (200, "primary".to_owned()));
        }
        worker.kill();
        let killed = Instant::now();
        let mut failed = 0;
        loop {
            let (status, variant) = call(&gw, "tensors", None, None);
            if status == 200 && variant == "backup" {
                break;
            }
            failed += u32::from(status != 200);
            assert!(killed.elapsed() < Duration::from_secs(10), "no fallback 10 s after the primary died");
        }
        eprintln!("fallback after {:?}, {failed} failed request(s) while the death was noticed", killed.elapsed());
        for _ in 0..50 {
            assert_eq!(call(&gw, "tensors", None, None), (200, "backup".to_owned()));
        }
        let log = gw.log();
        assert!(
            log.iter().any(|v| v["message"] == "falling back" && v["from"] == "primary" && v["to"] == "backup"),
            "the fallback is logged with both variants"
        );
    }
}

#[test]
fn a_failing_pool_opens_its_circuit_the_fallback_answers_and_probes_close_it() {
    let config = format!(
        "[[pools]]\nname = \"flaky\"\nclass = \"{ECHO}\"\ncircuit = {{ failures = 3, open_for = \"1s\", probes = 1 }}\n\
         [[pools]]\nname = \"backup\"\nclass = \"{ECHO}\"\n\
         [[aliases]]\nname = \"tensors\"\nfallbacks = [\"backup\"]\n\
         [[aliases.variants]]\nname = \"primary\"\npool = \"flaky\"\nmodel = \"echo\"\n\
         [[aliases.variants]]\nname = \"backup\"\npool = \"backup\"\nmodel = \"echo\"\n{NO_CACHE}"
    );
    let gw = Gateway::start(&config).unwrap();
    let failing = json!({"parameters": {"fail": true},
                         "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]});
    for _ in 0..3 {
        let resp = client().post(gw.url("/v2/models/tensors/infer")).json(&failing).send().unwrap();
        // The model's failure is the answer: no fallback for it.
        assert_eq!(resp.status(), 502);
    }
    let opened =
        gw.wait_log(0, Duration::from_secs(5), |v| v["message"] == "circuit opened: calls fail fast or fall back");
    assert_eq!(opened.expect("the opening is logged").1["pool"], "flaky");
    let metrics = client().get(gw.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("infergate_circuit_state{pool=\"flaky\"} 2"), "circuit gauge not open:\n{metrics}");
    // Open: the call does not reach `flaky`; the fallback answers.
    assert_eq!(call(&gw, "tensors", None, None), (200, "backup".to_owned()));
    // After open_for, one probe goes to `flaky`; it succeeds and closes the circuit.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(call(&gw, "tensors", None, None), (200, "primary".to_owned()));
    assert!(gw.wait_log(0, Duration::from_secs(5), |v| v["message"] == "circuit closed: probes succeeded").is_some());
    assert_eq!(call(&gw, "tensors", None, None), (200, "primary".to_owned()));
}
